# bench/lib.sh: helpers shared by bench/run.sh, bench/handoff.sh and
# bench/steering.sh. Source it after setting NAME (the script is
# bench/NAME.sh, for messages); it sets ROOT and tmp (a scratch directory
# removed on exit unless BENCH_KEEP=1 or the run failed). build_shoal
# builds SHOAL (unless given) and the tools named in BUILD into $tmp.
# Every process started with spawn is killed on exit.

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "bench/$NAME.sh: $*"
	exit 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/shoal-$NAME.XXXXXX")
mkdir -p "$tmp/logs"

ALL_PIDS=() # every job started here (each the leader of its process group)
CUR_PIDS=() # the jobs now running

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	for p in "${ALL_PIDS[@]}"; do
		kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	if ((rc != 0)) || [[ ${BENCH_KEEP:-} == 1 ]]; then
		log "scratch directory kept: $tmp"
	else
		rm -rf "$tmp"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# spawn NAME CMD...: runs CMD in the background, in a session and process
# group of its own (setsid), so that it and its children can be killed
# whole; its output goes to logs/NAME.log. LAST_PID is its pid.
spawn() {
	local name=$1
	shift
	setsid "$@" >>"$tmp/logs/$name.log" 2>&1 </dev/null &
	LAST_PID=$!
	ALL_PIDS+=("$LAST_PID")
	CUR_PIDS+=("$LAST_PID")
}

# stop_current: SIGTERM to each job's process group, SIGKILL after 5 s.
# shoal's workers live in process groups of their own: shoal stops them on
# SIGTERM, and their parent-death signal ends them if shoal is killed.
stop_current() {
	local p i
	for p in "${CUR_PIDS[@]}"; do
		kill -TERM -- "-$p" 2>/dev/null || true
	done
	for p in "${CUR_PIDS[@]}"; do
		for ((i = 0; i < 100; i++)); do
			kill -0 "$p" 2>/dev/null || break
			sleep 0.05
		done
		kill -KILL -- "-$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	CUR_PIDS=()
}

NEXT_PORT=$((20000 + RANDOM % 20000))
# new_port: sets NEW_PORT to a loopback port no socket uses now; a fresh one
# for each contender, so no run inherits another's TIME_WAIT or queues.
# (It sets a variable rather than printing: $(new_port) would run in a
# subshell and hand out the same port twice.)
new_port() {
	local p
	while :; do
		p=$NEXT_PORT
		NEXT_PORT=$((NEXT_PORT + 1))
		((NEXT_PORT > 60000)) && NEXT_PORT=20000
		if [[ -z $(ss -Htan "sport = :$p" 2>/dev/null) ]]; then
			NEW_PORT=$p
			return
		fi
	done
}

listeners() { ss -Hltn "sport = :$1" 2>/dev/null | wc -l; }

# wait_listen PORT COUNT: until exactly COUNT LISTEN sockets are on PORT
# and it answers hello world.
wait_listen() {
	local port=$1 want=$2 i
	for ((i = 0; i < 400; i++)); do
		if [[ $(listeners "$port") == "$want" ]] &&
			[[ $(curl -s --max-time 2 "http://127.0.0.1:$port/") == "hello world" ]]; then
			return 0
		fi
		sleep 0.05
	done
	ss -ltnp "sport = :$port" >&2 || true
	die "port $port: want $want LISTEN sockets answering 'hello world', have $(listeners "$port") (logs: $tmp/logs)"
}

now_ms() { date +%s%3N; }

# field NAME LINE: the value of NAME=... in a key=value line.
field() { awk -v k="$1" '{for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) {print substr($i, length(k) + 2); exit}}' <<<"$2"; }

# wrk_run MODE SECONDS PORT [CONNS]: prints wrk's summary line
# (bench/report.lua). MODE: keepalive, close (a new connection per request)
# or paced (keep-alive, each connection waiting PACE_MS, default 1.5, after
# each answer: bench/paced.lua). CONNS defaults to $CONNS, the threads to
# $THREADS or BENCH_THREADS (1).
wrk_run() {
	local mode=$1 secs=$2 port=$3 conns=${4:-$CONNS}
	local hdr=() lua=$ROOT/bench/report.lua
	[[ $mode == close ]] && hdr=(-H 'Connection: close')
	[[ $mode == paced ]] && lua=$ROOT/bench/paced.lua
	BENCH_LUA=$ROOT/bench/report.lua BENCH_DELAY_MS=${PACE_MS:-1.5} \
		wrk -t"${THREADS:-${BENCH_THREADS:-1}}" -c"$conns" -d"${secs}s" --latency -s "$lua" "${hdr[@]}" \
		"http://127.0.0.1:$port/" >"$tmp/wrk.out" 2>&1 || {
		cat "$tmp/wrk.out" >&2
		die "wrk failed"
	}
	grep '^WRK ' "$tmp/wrk.out" | sed 's/^WRK //'
}

# median: the median of the numbers on stdin, one a line ("-" if none).
median() { sort -g | awk '{a[NR] = $1} END {if (!NR) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

# need_netns: whether the reload scenario can run (root, unshare, ip).
need_netns() { [[ $(id -u) == 0 ]] && command -v unshare >/dev/null && command -v ip >/dev/null; }

# need_reload_secs SECS: dies unless SECS leaves room for reloads, which
# reload-ns.sh runs from 1 s into the load until 2 s before its end.
need_reload_secs() {
	(($1 >= 4)) || die "BENCH_RELOAD_SECS=$1 is too short: reloads run from 1 s into the load until 2 s before its end; use 4 or more"
}

# reload_cell MODE MIGRATE BIND STEERING SECS CONNS: one run of
# bench/reload-ns.sh in a network namespace of its own; prints its RL line
# (without the "RL ").
reload_cell() {
	local dir=$tmp/rl-$1-$2-$3-$4-$RANDOM
	unshare --net env SHOAL="$SHOAL" MODE="$1" MIGRATE="$2" BIND="$3" STEERING="$4" SECS="$5" CONNS="$6" \
		THREADS="${BENCH_THREADS:-1}" LUA="$ROOT/bench/report.lua" DIR="$dir" bash "$ROOT/bench/reload-ns.sh" \
		>"$dir.out" 2>&1 || die "reload scenario ($*) failed: $(tail -n 5 "$dir.out")"
	grep '^RL ' "$dir.out" | sed 's/^RL //'
}

# errors LINE: the failed requests of a wrk line (every error count).
errors() {
	local l=$1
	echo $(($(field err_connect "$l") + $(field err_read "$l") + $(field err_write "$l") + $(field err_status "$l") + $(field err_timeout "$l")))
}

meta() { echo "meta $1 $2" >>"$RAW"; }

# common_meta: the machine and versions, into RAW.
common_meta() {
	meta date "$(date -u +%Y-%m-%dT%H:%MZ)"
	meta cpus "$(nproc)"
	meta cpu_model "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
	meta kernel "$(uname -sr)"
	meta shoal "$(git describe --always --dirty 2>/dev/null || echo unknown)"
	meta go "$(go version | awk '{print $3}')"
	meta wrk "$(wrk -v 2>&1 | head -n 1 | awk '{print $2}')"
	meta loadavg "$(cut -d' ' -f1-3 /proc/loadavg)"
}

for t in wrk curl ss awk; do command -v $t >/dev/null || die "$t is missing"; done

# build_shoal: builds SHOAL (unless given) and the tools named in BUILD
# into $tmp.
build_shoal() {
	if [[ -z ${SHOAL:-} ]]; then
		log "building shoal into $tmp"
		SHOAL=$tmp/shoal
		go build -o "$SHOAL" . || die "go build failed"
	fi
	local b
	for b in ${BUILD:-}; do
		go build -o "$tmp/$b" "./bench/$b" || die "go build ./bench/$b failed"
	done
}
