-- Argo CD health check for beam-backfill.dev/BeamBackfill.
-- Argo CD runs this with gopher-lua (Lua 5.1): every number is a float and a JSON null is a
-- missing key, so numbers are printed through math.floor and every field may be nil.
--
--   status                     -> health
--   (no status block, "")       Progressing: the operator has not reconciled it yet
--   staging, transporting       Progressing
--   completed                   Healthy
--   failed                      Degraded, message = status.error_message
--   cancelled                   Suspended: an intentional stop by spec.cancel, not a fault
--   staging, transporting with  Suspended: paused by spec.suspend (condition Suspended True)
--     condition Suspended True
--   anything else               Unknown (a newer operator than this check)
local hs = {}

local function count(n)
  if type(n) == "number" then
    return string.format("%d", math.floor(n))
  end
  return "?"
end

local st = obj.status
local phase = nil
if st ~= nil then
  phase = st.status
end
local cancelling = obj.spec ~= nil and obj.spec.cancel == true

if phase == nil or phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the backfill"
elseif phase == "staging" then
  hs.status = "Progressing"
  hs.message = "Staging: exporting the window from Snowflake to parquet chunks"
elseif phase == "transporting" then
  hs.status = "Progressing"
  if st.num_chunks ~= nil then
    hs.message = "Transporting: " .. count(st.chunks_left) .. " of " .. count(st.num_chunks) .. " chunks left"
  else
    hs.message = "Transporting"
  end
elseif phase == "completed" then
  hs.status = "Healthy"
  if st.num_rows ~= nil then
    hs.message = "Completed: " .. count(st.num_rows) .. " rows in " .. count(st.num_chunks) .. " chunks delivered"
  else
    hs.message = "Completed"
  end
elseif phase == "failed" then
  hs.status = "Degraded"
  if st.error_message ~= nil and st.error_message ~= "" then
    hs.message = st.error_message
  else
    hs.message = "Backfill failed without an error message; see the operator's events"
  end
elseif phase == "cancelled" then
  hs.status = "Suspended"
  hs.message = "Cancelled by spec.cancel"
else
  hs.status = "Unknown"
  hs.message = "Unknown backfill status: " .. tostring(phase)
end

-- Paused by spec.suspend: the condition says so once the operator has acted on it.
local suspended = false
if st ~= nil and type(st.conditions) == "table" then
  for _, c in ipairs(st.conditions) do
    if c.type == "Suspended" and c.status == "True" then
      suspended = true
    end
  end
end
if suspended and (phase == "staging" or phase == "transporting") then
  hs.status = "Suspended"
  hs.message = "Suspended by spec.suspend (" .. hs.message .. ")"
end

-- Cancellation takes a moment (Jobs are deleted first); say so rather than show progress.
if cancelling and hs.status == "Progressing" then
  hs.message = "Cancelling (" .. hs.message .. ")"
end

return hs
