local hs = {status = "Progressing", message = "waiting for the controller"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local gen = obj.metadata.generation
local ready, stalled
for _, c in ipairs(obj.status.conditions) do
  if c.observedGeneration == nil or gen == nil or c.observedGeneration == gen then
    if c.type == "Ready" then ready = c end
    if c.type == "Stalled" then stalled = c end
  end
end
if stalled ~= nil and stalled.status == "True" then
  return {status = "Degraded", message = stalled.reason .. ": " .. (stalled.message or "")}
end
if ready ~= nil and ready.status == "True" then
  return {status = "Healthy", message = ready.message or ready.reason}
end
if ready ~= nil then
  hs.message = ready.reason .. ": " .. (ready.message or "")
end
return hs
