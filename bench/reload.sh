#!/usr/bin/env bash
# bench/reload.sh: scenario 6 of bench/run.sh, run by it inside a private
# network namespace (unshare --net, as root): rolling reloads of 4 built-in
# Go workers, back to back, while wrk loads them; wrk never retries, so
# every failed request shows in its error counts.
#
# Environment: SHOAL, MODE (keepalive|close), SECS, CONNS, THREADS, LUA, DIR;
# PCAP=1 also records every TCP reset on loopback into DIR/rst.pcap.
# Prints one line: S6 mode=... reloads=... reload_ms_p50=... requests=... err_...
set -euo pipefail

mkdir -p "$DIR"
ip link set lo up
sysctl -qw net.ipv4.tcp_migrate_req=1 # this namespace's own value only
export NSTAT_HISTORY=$DIR/nstat.hist  # nstat keeps its history here, not in /tmp
nstat -n >/dev/null

port=8000 workers=4 sock=$DIR/ctl.sock
"$SHOAL" --workers $workers --port $port --host 127.0.0.1 --metrics-addr "" --control "$sock" \
	--migrate-req on --stop-timeout 10s --log-format json 2>"$DIR/shoal.log" &
master=$!
trap 'kill -KILL $master ${dump:-} 2>/dev/null || true' EXIT

for ((i = 0; i < 200; i++)); do
	[[ $(ss -Hltn "sport = :$port" | wc -l) == "$workers" ]] && [[ -S $sock ]] && break
	sleep 0.05
done
[[ $(ss -Hltn "sport = :$port" | wc -l) == "$workers" ]] || {
	echo "workers not listening" >&2
	cat "$DIR/shoal.log" >&2
	exit 1
}

# PCAP=1: record every TCP reset on loopback, to find where failures come from.
if [[ ${PCAP:-} == 1 ]]; then
	tcpdump -i lo -nn -w "$DIR/rst.pcap" 'tcp[tcpflags] & tcp-rst != 0' 2>"$DIR/tcpdump.log" &
	dump=$!
	sleep 0.5
fi

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
	echo "reload start $t0" >>"$DIR/ctl.log"
	if "$SHOAL" ctl --control "$sock" reload >>"$DIR/ctl.log" 2>&1; then
		durs+=($((($(date +%s%N) - t0) / 1000000)))
	else
		fails=$((fails + 1))
	fi
done
wait $wrkpid
if [[ ${PCAP:-} == 1 ]]; then
	sleep 0.3
	kill "$dump" 2>/dev/null || true
	wait "$dump" 2>/dev/null || true
fi

sorted=$(printf '%s\n' "${durs[@]}" | sort -n)
n=${#durs[@]}
p50=$(sed -n "$(((n + 1) / 2))p" <<<"$sorted")
pmax=$(tail -n 1 <<<"$sorted")
nstat -az >"$DIR/nstat.txt"
ns=$(awk '$1 ~ /^(TcpExtListenOverflows|TcpExtListenDrops|TcpExtTCPMigrateReqSuccess|TcpExtTCPMigrateReqFailure|TcpExtTCPAbortOnClose|TcpExtTCPAbortOnData|TcpAttemptFails|TcpEstabResets|TcpOutRsts)$/ {sub(/^TcpExt/, "", $1); printf "%s=%s ", $1, $2}' "$DIR/nstat.txt")
echo "S6 mode=$MODE workers=$workers conns=$CONNS secs=$SECS reloads=$n reload_fail=$fails reload_ms_p50=${p50:-0} reload_ms_max=${pmax:-0} $(grep '^WRK ' "$DIR/wrk.out" | sed 's/^WRK //') $ns"
