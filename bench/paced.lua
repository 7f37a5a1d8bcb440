-- wrk script of scenario 2's paced mode: bench/report.lua's summary line,
-- and each connection waits BENCH_DELAY_MS (default 2) after each answer
-- before it sends the next request, so that every contender serves about
-- the same rate, connections / (delay + latency), well under the
-- machine's limit: the masters' CPU is then compared at one message rate.
dofile(os.getenv("BENCH_LUA"))
local ms = tonumber(os.getenv("BENCH_DELAY_MS") or "2")
function delay()
  return ms
end
