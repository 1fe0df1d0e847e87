-- Argo CD health of a finetune.dev SyntheticDataset (resource.customizations.health.finetune.dev_SyntheticDataset).
-- Reads the operator's kstatus conditions (Ready, Reconciling, Stalled) and its phase; see docs/gitops.md.
-- Reviewing waits for people (ftctl review), as a FineTuneJob awaiting approval does: Suspended.
-- Written for Argo CD's Lua (gopher-lua, Lua 5.1): only the base and string/table libraries.
local hs = {}

local function is_true(status, kind)
  if status.conditions == nil then
    return false
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c.status == "True"
    end
  end
  return false
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for finetune-operator to start this SyntheticDataset"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and observed ~= nil and observed ~= 0 and observed ~= generation then
  hs.status = "Progressing"
  hs.message = "Reconciling generation " .. tostring(generation) .. " (status is for generation " ..
    tostring(observed) .. ")"
  return hs
end

local message = status.message or ""
if message == "" then
  message = status.phase
end

if status.phase == "Ready" and is_true(status, "Ready") then
  hs.status = "Healthy"
elseif is_true(status, "Stalled") or status.phase == "Invalid" or status.phase == "Failed" then
  hs.status = "Degraded"
  message = status.phase .. ": " .. message
elseif status.phase == "Reviewing" then
  hs.status = "Suspended"
  message = "Reviewing: " .. message
else
  hs.status = "Progressing"
  message = status.phase .. ": " .. message
end
hs.message = message
return hs
