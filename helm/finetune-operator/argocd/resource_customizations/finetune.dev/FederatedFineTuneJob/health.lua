-- Argo CD health of a finetune.dev FederatedFineTuneJob
-- (resource.customizations.health.finetune.dev_FederatedFineTuneJob).
-- Reads the operator's kstatus conditions (Ready, Reconciling, Stalled) and its phase; see docs/gitops.md
-- and docs/federated.md. Written for Argo CD's Lua (gopher-lua, Lua 5.1): only the base and
-- string/table libraries.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(status, kind)
  local c = condition(status, kind)
  return c ~= nil and c.status == "True"
end

-- "check (message)" for each governance check that did not pass.
local function failing_checks(status)
  local failing = {}
  if status.governance ~= nil and status.governance.checks ~= nil then
    for _, check in ipairs(status.governance.checks) do
      if check.passed ~= true then
        local text = tostring(check.name)
        if check.message ~= nil and check.message ~= "" then
          text = text .. " (" .. tostring(check.message) .. ")"
        end
        table.insert(failing, text)
      end
    end
  end
  return failing
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for finetune-operator to reconcile this FederatedFineTuneJob"
  return hs
end

-- observedGeneration 0 is the CRD's default (never observed): the phase says what is going on.
local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and observed ~= nil and observed ~= 0 and observed ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for finetune-operator to observe generation " .. tostring(generation) ..
    " (status is for generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local phase = status.phase
local message = status.message or ""
if message == "" then
  message = phase
end

if phase == "Succeeded" or is_true(status, "Ready") then
  hs.status = "Healthy"
  hs.message = message
  return hs
end

if is_true(status, "Stalled") or phase == "Failed" then
  hs.status = "Degraded"
  local failing = failing_checks(status)
  local promotion = status.promotion or {}
  if #failing > 0 and promotion.state == "Blocked" then
    hs.message = "Blocked by governance: failing checks: " .. table.concat(failing, "; ") .. ". " .. message
  else
    hs.message = message
  end
  return hs
end

if phase == "AwaitingApproval" then
  hs.status = "Suspended"
  hs.message = "Awaiting approval: " .. message
  return hs
end

-- A participant's Dataset does not exist (yet): the federation waits for it, by name.
local datasets = condition(status, "DatasetsReady")
if phase == "WaitingForDatasets" and datasets ~= nil and datasets.reason == "DatasetMissing" then
  hs.status = "Missing"
  hs.message = message
  return hs
end

hs.status = "Progressing"
hs.message = phase .. ": " .. message
return hs
