#!/usr/bin/env bash
# bench/reload-ns.sh: the reload scenario of bench/handoff.sh and
# bench/steering.sh, run by them inside a private network namespace
# (unshare --net, as root): rolling reloads of 4 built-in Go workers, back to
# back, while wrk loads them; wrk never retries, so every failed request
# shows in its error counts. bench/reload.sh (scenario 6 of bench/run.sh)
# with tcp_migrate_req, --bind and --steering as parameters.
#
# Environment: SHOAL, MODE (keepalive|close), SECS (4 or more: see
# need_reload_secs in lib.sh), CONNS, THREADS, LUA, DIR,
# MIGRATE (0|1: net.ipv4.tcp_migrate_req in this namespace), BIND
# (worker|master), STEERING (hash|round-robin).
# Prints one line: RL mode=... migrate=... bind=... steering=... reloads=... requests=... err_...
set -euo pipefail

mkdir -p "$DIR"
ip link set lo up
sysctl -qw net.ipv4.tcp_migrate_req="$MIGRATE" # this namespace's own value only
export NSTAT_HISTORY=$DIR/nstat.hist           # nstat keeps its history here, not in /tmp
nstat -n >/dev/null

port=8000 workers=4 sock=$DIR/ctl.sock
"$SHOAL" --workers $workers --port $port --host 127.0.0.1 --metrics-addr "" --control "$sock" \
	--migrate-req off --bind "$BIND" --steering "$STEERING" --stop-timeout 10s --log-format json 2>"$DIR/shoal.log" &
master=$!
trap 'kill -KILL $master 2>/dev/null || true' EXIT

for ((i = 0; i < 200; i++)); do
	[[ $(ss -Hltn "sport = :$port" | wc -l) == "$workers" ]] && [[ -S $sock ]] &&
		[[ $(curl -s --max-time 2 "http://127.0.0.1:$port/") == "hello world" ]] && break
	sleep 0.05
done
[[ $(ss -Hltn "sport = :$port" | wc -l) == "$workers" ]] || {
	echo "workers not listening" >&2
	cat "$DIR/shoal.log" >&2
	exit 1
}
sleep 0.3 # steering: every worker in the selection

hdr=()
[[ $MODE == close ]] && hdr=(-H 'Connection: close')
wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency -s "$LUA" "${hdr[@]}" "http://127.0.0.1:$port/" >"$DIR/wrk.out" 2>&1 &
wrkpid=$!

# Reload back to back from 1 s after the load starts until 2 s before it ends.
sleep 1
end=$(($(date +%s%3N) + SECS * 1000 - 3000))
durs=()
fails=0
while (($(date +%s%3N) < end)); do
	t0=$(date +%s%N)
	if "$SHOAL" ctl --control "$sock" reload >>"$DIR/ctl.log" 2>&1; then
		durs+=($((($(date +%s%N) - t0) / 1000000)))
	else
		fails=$((fails + 1))
	fi
done
wait $wrkpid

sorted=$(printf '%s\n' "${durs[@]}" | sort -n)
n=${#durs[@]}
p50=0
((n > 0)) && p50=$(sed -n "$(((n + 1) / 2))p" <<<"$sorted")
nstat -az >"$DIR/nstat.txt"
ns=$(awk '$1 ~ /^(TcpExtListenOverflows|TcpExtListenDrops|TcpExtTCPMigrateReqSuccess|TcpExtTCPMigrateReqFailure|TcpEstabResets|TcpOutRsts)$/ {sub(/^TcpExt/, "", $1); printf "%s=%s ", $1, $2}' "$DIR/nstat.txt")
echo "RL mode=$MODE migrate=$MIGRATE bind=$BIND steering=$STEERING workers=$workers conns=$CONNS secs=$SECS reloads=$n reload_fail=$fails reload_ms_p50=${p50:-0} $(grep '^WRK ' "$DIR/wrk.out" | sed 's/^WRK //') $ns"
