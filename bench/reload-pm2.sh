#!/usr/bin/env bash
# bench/reload-pm2.sh: the reload part of scenario 9 of bench/run.sh, run by
# it inside a private network namespace (unshare --net, as root): 3 rolling
# reloads back to back, `shoal ctl reload` against `pm2 reload`, of the same
# Node.js app (bench/node/app.js with BENCH_GRACEFUL=1: it says ready with
# process.send('ready') and closes gracefully on SIGINT or SIGTERM), while
# wrk loads it. wrk never retries, so every failed request shows in its
# error counts.
#
# shoal runs with tcp_migrate_req=1 (set in this namespace only), as its
# README recommends; PM2 runs in cluster mode configured as its graceful
# start and shutdown documentation recommends: wait_ready, listen_timeout,
# kill_timeout.
#
# Environment: SHOAL, NODE_BIN (the directory of node), PM2 (the pm2
# command), APP, N (workers), MODES ("close keepalive"), REPS, CONNS,
# THREADS, LUA, DIR.
# Prints one line per run: S9R contender=... mode=... rep=... reloads=3 reload_ms=... <wrk's fields> <nstat deltas>
set -euo pipefail

mkdir -p "$DIR"
ip link set lo up
sysctl -qw net.ipv4.tcp_migrate_req=1 # this namespace's own value only
export NSTAT_HISTORY=$DIR/nstat.hist  # nstat keeps its history here, not in /tmp
export PATH=$NODE_BIN:$PATH
export PM2_HOME=$DIR/pm2home # PM2's daemon, sockets and logs: ours alone
nstat -n >/dev/null

sport=8001 pport=8002 sock=$DIR/ctl.sock
pids=()
cleanup() {
	"$PM2" kill >/dev/null 2>&1 || true
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_port() { # PORT LISTEN-SOCKETS
	local i
	for ((i = 0; i < 400; i++)); do
		if [[ $(ss -Hltn "sport = :$1" | wc -l) == "$2" ]] && [[ $(curl -s --max-time 2 "http://127.0.0.1:$1/") == "hello world" ]]; then
			return 0
		fi
		sleep 0.05
	done
	echo "port $1: want $2 LISTEN sockets answering hello world" >&2
	exit 1
}

# Both stay in this script's process group, so that bench/run.sh ends them
# with it whatever happens: shoal's workers follow shoal (parent-death
# signal), PM2's God daemon runs in the foreground (--no-daemon, the same
# daemon code, which `pm2 reload` reaches through PM2_HOME as usual) and
# its cluster workers share its group.
"$SHOAL" --workers "$N" --port $sport --host 127.0.0.1 --metrics-addr "" --control "$sock" \
	--migrate-req on --ready message --env BENCH_GRACEFUL=1 --stop-timeout 5s --log-format json \
	-- node "$APP" 2>"$DIR/shoal.log" &
pids+=($!)
cat >"$DIR/ecosystem.config.js" <<EOF
// PM2's graceful reload, as its documentation recommends.
module.exports = { apps: [{
  name: 'bench', script: '$APP', exec_mode: 'cluster', instances: $N,
  wait_ready: true, listen_timeout: 10000, kill_timeout: 5000,
  env: { BENCH_MODE: 'cluster', BENCH_GRACEFUL: '1', PORT: '$pport', HOST: '127.0.0.1' },
}] };
EOF
"$PM2" start "$DIR/ecosystem.config.js" --no-daemon >"$DIR/pm2.log" 2>&1 &
pids+=($!)
wait_port $sport "$N"
wait_port $pport 1 # PM2's God daemon holds the one listening socket

# run CONTENDER MODE REP: load, 3 reloads back to back from 1 s into it, 1 s
# more, then wrk stops (SIGINT: it prints its results).
run() {
	local who=$1 mode=$2 rep=$3 port hdr=() i t0 durs=() fails=0 wrkpid
	[[ $who == shoal ]] && port=$sport || port=$pport
	[[ $mode == close ]] && hdr=(-H 'Connection: close')
	nstat -n >/dev/null
	wrk -t"$THREADS" -c"$CONNS" -d120s --latency -s "$LUA" "${hdr[@]}" "http://127.0.0.1:$port/" >"$DIR/wrk-$who-$mode-$rep.out" 2>&1 &
	wrkpid=$!
	sleep 1
	for ((i = 0; i < 3; i++)); do
		t0=$(date +%s%N)
		if [[ $who == shoal ]]; then
			"$SHOAL" ctl --control "$sock" reload >>"$DIR/ctl.log" 2>&1 || fails=$((fails + 1))
		else
			"$PM2" reload bench >>"$DIR/ctl.log" 2>&1 || fails=$((fails + 1))
		fi
		durs+=($((($(date +%s%N) - t0) / 1000000)))
	done
	sleep 1
	kill -INT "$wrkpid"
	wait "$wrkpid" || true
	local ns
	ns=$(nstat -z | awk '$1 ~ /^(TcpExtListenOverflows|TcpExtListenDrops|TcpExtTCPMigrateReqSuccess|TcpExtTCPMigrateReqFailure|TcpAttemptFails|TcpEstabResets)$/ {sub(/^TcpExt/, "", $1); printf "%s=%s ", $1, $2}')
	echo "S9R contender=$who mode=$mode rep=$rep workers=$N conns=$CONNS reloads=3 reload_fail=$fails reload_ms=$(
		IFS=,
		echo "${durs[*]}"
	) $(grep '^WRK ' "$DIR/wrk-$who-$mode-$rep.out" | sed 's/^WRK //') $ns"
	wait_port $sport "$N"
	wait_port $pport 1
}

for ((rep = 1; rep <= REPS; rep++)); do
	for mode in $MODES; do
		# Alternate which goes first.
		if ((rep % 2)); then order="shoal pm2"; else order="pm2 shoal"; fi
		for who in $order; do run "$who" "$mode" "$rep"; done
	done
done
