-- wrk script of scenario 2's paced mode: bench/report.lua's summary line,
-- and each connection waits BENCH_DELAY_MS (default 1.5) after each answer
-- before it sends the next request, so that every contender serves about
-- the same rate, connections / (delay + latency), well under the
-- machine's limit: the masters' CPU is then compared at one message rate.
-- wrk waits whole milliseconds: the fraction is carried over to the next
-- wait, so that the waits average BENCH_DELAY_MS.
dofile(os.getenv("BENCH_LUA"))
local ms = tonumber(os.getenv("BENCH_DELAY_MS") or "1.5")
local owed = 0
function delay()
  owed = owed + ms
  local d = math.floor(owed)
  owed = owed - d
  return d
end
