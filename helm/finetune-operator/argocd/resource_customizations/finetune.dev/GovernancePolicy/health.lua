-- Argo CD health of a finetune.dev GovernancePolicy (resource.customizations.health.finetune.dev_GovernancePolicy).
-- A policy is configuration: the operator reads it and writes no status, so an applied policy is
-- Healthy, and the message says what it requires and where (the API server has validated the spec).
-- Written for Argo CD's Lua (gopher-lua, Lua 5.1): only the base and string/table libraries.
local hs = {}
local spec = obj.spec or {}

local function list(values, empty)
  if values == nil or #values == 0 then
    return empty
  end
  local out = {}
  for _, v in ipairs(values) do
    table.insert(out, tostring(v))
  end
  return table.concat(out, ", ")
end

hs.status = "Healthy"
hs.message = "requires " .. list(spec.required, "no checks") .. "; applies to " ..
  list(spec.namespaces, "every namespace")
return hs
