-- Argo CD health check for corvid.dev/MqttCluster.
-- Reads what corvid-operator writes: status.observedGeneration and the conditions Available,
-- Progressing, Degraded and ReconcileSuccess (each True or False with a reason), and
-- spec.upgradeStrategy.paused. A condition that is missing or Unknown means "not known yet":
-- it is reported as Progressing, never as Degraded.
local hs = {}

local function condition(conditions, type_)
  for _, c in ipairs(conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason or c.type
end

if obj.status == nil or obj.status.conditions == nil or #obj.status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for corvid-operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for corvid-operator to observe generation " .. generation
  return hs
end

local conditions = obj.status.conditions
local available = condition(conditions, "Available")
local progressing = condition(conditions, "Progressing")
local degraded = condition(conditions, "Degraded")
local reconciled = condition(conditions, "ReconcileSuccess")

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
if reconciled ~= nil and reconciled.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(reconciled)
  return hs
end

local paused = obj.spec ~= nil and obj.spec.upgradeStrategy ~= nil and obj.spec.upgradeStrategy.paused == true
if paused then
  hs.status = "Suspended"
  hs.message = "Rollout paused (spec.upgradeStrategy.paused)"
  return hs
end

if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing)
  return hs
end

local known = {available, progressing, degraded, reconciled}
for i = 1, 4 do
  local c = known[i]
  if c == nil or (c.status ~= "True" and c.status ~= "False") then
    hs.status = "Progressing"
    hs.message = "Waiting for conditions to be known"
    return hs
  end
end

if available.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(available)
  return hs
end

hs.status = "Degraded"
hs.message = describe(available)
return hs
