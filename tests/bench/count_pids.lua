-- wrk script for the fairness case: counts responses per worker pid (the body names it, "Handled
-- by process <pid>"), stops each thread after its share of a fixed number of responses, and prints
-- the merged counts as "pid <pid> <count>" lines after wrk's summary.
--
--   wrk -t2 -c50 -d60s -H 'Connection: close' -s count_pids.lua URL -- <total> <marker-dir> <threads>
--
-- Each wrk thread runs in its own Lua state, so counts live per thread; done() runs in the main
-- state and collects them with thread:get, which copies tables between states (wrk's
-- script_copy_value handles nil, booleans, numbers, strings and tables). wrk's main thread sleeps
-- for the whole -d duration even after every thread called thread:stop(), so each thread also
-- leaves a marker file; run.sh waits for one per thread and then sends wrk SIGINT, which ends the
-- sleep and prints the summary at once (wrk's own handler for SIGINT).

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

-- Globals, not locals: thread:get reads a global of the thread's Lua state.
limit, marker_dir, counts, seen, other = 0, nil, {}, 0, 0

function init(args)
  local total, nthreads = tonumber(args[1]), tonumber(args[3])
  limit = math.ceil(total / nthreads)
  marker_dir = args[2]
end

function response(status, headers, body)
  if seen >= limit then return end
  seen = seen + 1
  local pid = body:match("Handled by process (%d+)")
  if pid then counts[pid] = (counts[pid] or 0) + 1 else other = other + 1 end
  if seen == limit then
    local f = io.open(marker_dir .. "/done." .. id, "w")
    if f then f:close() end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local merged, unnamed = {}, 0
  for _, t in ipairs(threads) do
    for pid, n in pairs(t:get("counts")) do merged[pid] = (merged[pid] or 0) + n end
    unnamed = unnamed + t:get("other")
  end
  for pid, n in pairs(merged) do io.write(string.format("pid %s %d\n", pid, n)) end
  io.write(string.format("unnamed %d\n", unnamed))
end
