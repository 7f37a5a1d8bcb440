#!/usr/bin/env bash
# bench/upgrade.sh: in-place upgrades of the master under load (issue 15).
#
#   bench/upgrade.sh            60 upgrades, 30 under each kind of load
#   BENCH_UPGRADES=10 bench/upgrade.sh
#
# Two builds of shoal that differ in their version (-X main.version=) take
# turns at the master's path; 4 built-in workers serve wrk (which never
# retries) with a new connection per request, then with keep-alive, while
# `shoal ctl upgrade` runs back to back. It prints, per kind of load, the
# requests answered, wrk's failed requests (socket errors and non-2xx), the
# upgrades, the time `shoal ctl upgrade` took (p50, max) and how long the
# master's loop was paused (the new master's paused_seconds, p50 and max),
# and checks that the workers' pids never changed. Run it on loopback; it
# needs wrk and Go.
set -euo pipefail

UPGRADES=${BENCH_UPGRADES:-60}
WORKERS=${BENCH_WORKERS:-4}
CONNS=${BENCH_CONNS:-32}
tmp=$(mktemp -d /tmp/shoal-bench-upgrade.XXXXXX)
master=
wrkpid=
cleanup() {
	[[ -n $wrkpid ]] && kill "$wrkpid" 2>/dev/null || true
	[[ -n $master ]] && kill "$master" 2>/dev/null && wait "$master" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || {
	echo "bench/upgrade.sh: wrk not found (apt-get install wrk)" >&2
	exit 2
}
go build -o "$tmp/shoal-a" -ldflags "-X main.version=bench-a" .
go build -o "$tmp/shoal-b" -ldflags "-X main.version=bench-b" .
install -m 0755 "$tmp/shoal-a" "$tmp/shoal"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sock=$tmp/ctl.sock
"$tmp/shoal" --workers "$WORKERS" --port "$port" --host 127.0.0.1 --control "$sock" --metrics-addr "" \
	--log-format json --migrate-req off 2>"$tmp/log" >/dev/null &
master=$!
for _ in $(seq 100); do
	[[ $(grep -c '"worker listening"' "$tmp/log" || true) -ge $WORKERS ]] && break
	sleep 0.1
done
pids() { "$tmp/shoal" ctl --control "$sock" --json status | python3 -c 'import json,sys; print(" ".join(str(w["pid"]) for w in json.load(sys.stdin)["result"]["workers"]))'; }
first=$(pids)
n=0
run() { # run LABEL WRK-ARGS...: upgrades back to back under wrk
	local label=$1
	shift
	local before
	before=$(grep -c 'upgraded in place: adopted' "$tmp/log" || true)
	wrk -t1 -c"$CONNS" -d600s "$@" "http://127.0.0.1:$port/" >"$tmp/wrk-$label" 2>&1 &
	wrkpid=$!
	sleep 1
	: >"$tmp/times-$label"
	for _ in $(seq $((UPGRADES / 2))); do
		n=$((n + 1))
		if ((n % 2)); then bin=b; else bin=a; fi
		install -m 0755 "$tmp/shoal-$bin" "$tmp/shoal.new" && mv "$tmp/shoal.new" "$tmp/shoal"
		t0=$(date +%s%N)
		"$tmp/shoal" ctl --control "$sock" upgrade >/dev/null
		echo $((($(date +%s%N) - t0) / 1000)) >>"$tmp/times-$label"
		sleep 0.2
	done
	sleep 1
	kill -INT "$wrkpid"
	wait "$wrkpid" || true
	wrkpid=
	grep 'upgraded in place: adopted' "$tmp/log" | tail -n +$((before + 1)) |
		python3 -c 'import json,sys; [print(int(json.loads(l)["paused_seconds"]*1e6)) for l in sys.stdin]' >"$tmp/paused-$label"
	python3 - "$label" "$tmp/wrk-$label" "$tmp/times-$label" "$tmp/paused-$label" <<'EOF'
import re, statistics, sys
label, wrk, times, paused = sys.argv[1:]
out = open(wrk).read()
reqs = int(re.search(r"(\d+) requests in", out).group(1))
errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
t = sorted(int(x) for x in open(times)) or [0]
p = sorted(int(x) for x in open(paused)) or [0]
ms = lambda us: f"{us / 1000:.1f} ms"
print(f"{label:16} {reqs:>9,} answered  {errs + non2xx:>3} failed  {len(t):>3} upgrades  "
      f"ctl upgrade p50 {ms(statistics.median(t))} max {ms(max(t))}  loop paused p50 {ms(statistics.median(p))} max {ms(max(p))}")
EOF
}
echo "shoal in-place upgrades: $WORKERS built-in workers, wrk -t1 -c$CONNS, $(nproc) CPUs, $(go env GOVERSION)"
run "new connection" -H "Connection: close"
run "keep-alive"
last=$(pids)
if [[ $first != "$last" ]]; then
	echo "worker pids changed: $first -> $last" >&2
	exit 1
fi
echo "worker pids unchanged after $n upgrades: $last"
