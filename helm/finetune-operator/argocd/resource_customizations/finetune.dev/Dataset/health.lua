-- Argo CD health of a finetune.dev Dataset (resource.customizations.health.finetune.dev_Dataset).
-- Reads the operator's kstatus conditions (Ready, Reconciling, Stalled) and its phase; see docs/gitops.md.
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
  hs.message = "Waiting for finetune-operator to validate this Dataset"
  return hs
end

-- A Dataset validates each generation once; while generation N validates, the status still says N-1.
-- observedGeneration 0 (the CRD's default) means no verdict yet: the phase says what is going on.
local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and observed ~= nil and observed ~= 0 and observed ~= generation then
  hs.status = "Progressing"
  hs.message = "Validating generation " .. tostring(generation) .. " (status is for generation " ..
    tostring(status.observedGeneration) .. ")"
  if status.phase == "Validating" and status.message ~= nil and status.message ~= "" then
    hs.message = hs.message .. ": " .. status.message
  end
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
else
  hs.status = "Progressing"
  message = status.phase .. ": " .. message
end
hs.message = message
return hs
