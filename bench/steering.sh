#!/usr/bin/env bash
# bench/steering.sh: --steering round-robin (an eBPF program of the master's)
# against --steering hash (the kernel's), side by side in one run (issue 14).
#
#   bench/steering.sh            the full run (about 12 minutes on 2 CPUs)
#   bench/steering.sh --quick    a short run (about 6 minutes)
#
# 1. Balance: 16 keep-alive connections (wrk -c16) on 2 and 4 built-in Go
#    workers, the established connections of each worker counted with ss
#    during the load; busiest and idlest worker, repeated (the modes
#    alternate).
# 2. Reloads under load: bench/reload-ns.sh, 4 workers reloaded back to back
#    under wrk (which never retries), with tcp_migrate_req=0 and 1, each in a
#    network namespace of its own (root); failed requests per reload.
# 3. Throughput: 2 workers each, wrk keep-alive and new connection per
#    request, alternating short rounds; the median of the ratios
#    round-robin/hash measured in the same round (the program must cost
#    nothing measurable). It also records the CPU time of the workers, the
#    master and wrk per request (where the program's cost would show: it
#    runs in the kernel, on the handshake's path). On a shared machine both
#    swing with other people's load by far more than 2%, so with
#    BENCH_BPF_STATS=1 (root) it also reads the kernel's
#    own accounting of the program's run time (bench/bpfstats: BPF_ENABLE_STATS,
#    on only while the throughput part runs, for every BPF program of the
#    machine, and off when bench/bpfstats ends, however it ends): nanoseconds
#    per connection placed.
#
# Every shoal here binds with --bind worker (bench/handoff.sh measures
# --bind master). It writes $BENCH_OUT/benchmarks-steering.md and
# $BENCH_OUT/benchmarks-steering-raw.txt (BENCH_OUT defaults to docs).
# Knobs (environment): BENCH_ROUNDS (throughput rounds), BENCH_RL_ROUNDS
# (reload rounds), BENCH_PARTS (a subset of "balance reload throughput"),
# BENCH_BAL_REPEATS, BENCH_DURATION (seconds per throughput run),
# BENCH_BPF_STATS=1, BENCH_RELOAD_SECS, BENCH_CONNS (wrk connections for reloads and
# throughput, 32), SHOAL (a built binary; else it is built), BENCH_KEEP=1.
set -euo pipefail

NAME=steering
QUICK=0
for a in "$@"; do
	case $a in
	--quick) QUICK=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "bench/steering.sh: unknown argument $a (want --quick)" >&2
		exit 2
		;;
	esac
done
if ((QUICK)); then
	ROUNDS=${BENCH_ROUNDS:-16} REP=${BENCH_BAL_REPEATS:-6} DUR=${BENCH_DURATION:-2} RSECS=${BENCH_RELOAD_SECS:-8} RL_ROUNDS=${BENCH_RL_ROUNDS:-2}
else
	ROUNDS=${BENCH_ROUNDS:-30} REP=${BENCH_BAL_REPEATS:-20} DUR=${BENCH_DURATION:-2} RSECS=${BENCH_RELOAD_SECS:-10} RL_ROUNDS=${BENCH_RL_ROUNDS:-4}
fi
CONNS=${BENCH_CONNS:-32}
PARTS=" ${BENCH_PARTS:-balance reload throughput} "
BUILD=""
[[ ${BENCH_BPF_STATS:-} == 1 ]] && BUILD=bpfstats
source "$(dirname "$0")/lib.sh"
need_reload_secs "$RSECS"
build_shoal
OUT=${BENCH_OUT:-docs}
RAW=$tmp/raw.txt
: >"$RAW"
start_time=$(date +%s)
common_meta
meta mode "$( ((QUICK)) && echo quick || echo full)"
meta rounds "$ROUNDS"
meta reload_rounds "$RL_ROUNDS"
meta balance_repeats "$REP"
meta duration "$DUR"
meta reload_secs "$RSECS"
meta conns "$CONNS"

# start_shoal STEERING WORKERS: a shoal of built-in Go workers on a new port;
# sets PORT and MPID.
start_shoal() {
	new_port
	PORT=$NEW_PORT
	spawn "$1-$2-$PORT" "$SHOAL" --workers "$2" --port "$PORT" --host 127.0.0.1 --metrics-addr "" --control "" \
		--migrate-req off --bind worker --steering "$1" --stop-timeout 3s --log-format json
	MPID=$LAST_PID
	wait_listen "$PORT" "$2"
	sleep 0.3 # round-robin: every worker in the selection
	if [[ $1 == round-robin ]]; then
		grep -q '"steering":"round-robin"' "$tmp/logs/$1-$2-$PORT.log" ||
			die "shoal on port $PORT does not steer round-robin: $(grep -i steering "$tmp/logs/$1-$2-$PORT.log" | head -n 2)"
	fi
}

# tree_ticks MASTER: CPU time (utime+stime, clock ticks) of the master and
# its workers.
tree_ticks() {
	local p t=0 s
	for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
		s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
		s=${s##*) }
		set -- $s
		t=$((t + ${12} + ${13}))
	done
	echo "$t"
}

# wrk_cpu MODE SECONDS PORT CONNS: like wrk_run, with wrk's own CPU time
# (clock ticks, from its parent's cutime+cstime once it is reaped) appended
# as wrk_ticks=.
wrk_cpu() {
	local hdr=""
	[[ $1 == close ]] && hdr="Connection: close"
	bash -c 'if [[ -n $5 ]]; then wrk -t1 -c"$4" -d"$2s" -s "$1" -H "$5" "http://127.0.0.1:$3/"; else wrk -t1 -c"$4" -d"$2s" -s "$1" "http://127.0.0.1:$3/"; fi >"$6" 2>&1 || exit 1
		read -r -a s </proc/$$/stat; echo "wrk_ticks=$((s[15] + s[16]))"' \
		_ "$ROOT/bench/report.lua" "$2" "$3" "$4" "$hdr" "$tmp/wrk.out" >"$tmp/wrk.ticks" || {
		cat "$tmp/wrk.out" >&2
		die "wrk failed"
	}
	echo "$(grep '^WRK ' "$tmp/wrk.out" | sed 's/^WRK //') $(cat "$tmp/wrk.ticks")"
}

# conns_per_worker PORT MASTER: the established connections of each of the
# master's workers on PORT, busiest first ("5 4 4 3").
conns_per_worker() {
	local kids
	kids=$(cat /proc/"$2"/task/*/children 2>/dev/null)
	ss -Htnp state established "( sport = :$1 )" | grep -o 'pid=[0-9]*' | cut -d= -f2 |
		awk -v kids="$kids" 'BEGIN {n = split(kids, k, " "); for (i = 1; i <= n; i++) c[k[i]] = 0}
			{c[$1]++} END {for (p in c) print c[p]}' | sort -rn | tr '\n' ' ' | sed 's/ $//'
}

# --- 1. balance --------------------------------------------------------------

[[ $PARTS == *" balance "* ]] && log "balance: 16 keep-alive connections on 2 and 4 workers, $REP repeats"
[[ $PARTS == *" balance "* ]] && for w in 2 4; do
	start_shoal hash "$w"
	hport=$PORT hpid=$MPID
	start_shoal round-robin "$w"
	rport=$PORT rpid=$MPID
	for ((r = 1; r <= REP; r++)); do
		order="hash round-robin"
		((r % 2 == 0)) && order="round-robin hash"
		for s in $order; do
			if [[ $s == hash ]]; then port=$hport mp=$hpid; else port=$rport mp=$rpid; fi
			wrk -t1 -c16 -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1 &
			wpid=$!
			sleep 1
			counts=$(conns_per_worker "$port" "$mp")
			wait "$wpid" || die "wrk failed (balance, $s)"
			set -- $counts
			echo "s_balance workers=$w steering=$s repeat=$r total=$(($(tr ' ' '+' <<<"$counts"))) busiest=$1 idlest=${!#} counts=${counts// /,}" >>"$RAW"
		done
	done
	log "  $w workers: hash $(grep "^s_balance workers=$w steering=hash " "$RAW" | sed 's/.*counts=//' | tr '\n' ' ')"
	log "  $w workers: round-robin $(grep "^s_balance workers=$w steering=round-robin " "$RAW" | sed 's/.*counts=//' | tr '\n' ' ')"
	stop_current
done

# --- 2. reloads under load ----------------------------------------------------

if [[ $PARTS != *" reload "* ]]; then
	:
elif need_netns; then
	log "reloads under load: --steering hash and round-robin, tcp_migrate_req 0 and 1, $RL_ROUNDS rounds of $RSECS s"
	for ((r = 1; r <= RL_ROUNDS; r++)); do
		for mig in 0 1; do
			for mode in close keepalive; do
				order="hash round-robin"
				((r % 2 == 0)) && order="round-robin hash"
				for s in $order; do
					line=$(reload_cell "$mode" "$mig" worker "$s" "$RSECS" "$CONNS")
					echo "s_reload round=$r $line" >>"$RAW"
					log "  round $r migrate=$mig $mode steering=$s: reloads=$(field reloads "$line") failed=$(errors "$line") of $(field requests "$line")"
				done
			done
		done
	done
else
	log "reload scenario skipped: it needs root, unshare and ip (a private network namespace)"
	echo "s_reload_skip reason=needs-root-unshare-ip" >>"$RAW"
fi

# --- 3. throughput --------------------------------------------------------------

[[ $PARTS == *" throughput "* ]] && {
log "throughput: 2 workers, round-robin against hash, $ROUNDS rounds of ${DUR}s"
start_shoal hash 2
hport=$PORT hpid=$MPID
start_shoal round-robin 2
rport=$PORT rpid=$MPID
if [[ ${BENCH_BPF_STATS:-} == 1 ]]; then
	spawn bpfstats "$tmp/bpfstats" -hold
	for ((i = 0; i < 40; i++)); do grep -q enabled "$tmp/logs/bpfstats.log" && break; sleep 0.05; done
	grep -q enabled "$tmp/logs/bpfstats.log" || die "bench/bpfstats -hold: $(cat "$tmp/logs/bpfstats.log")"
	meta bpf_stats on
fi
# bpf_now: "run_time_ns run_cnt" of the round-robin master's program, or "0 0".
bpf_now() {
	if [[ ${BENCH_BPF_STATS:-} == 1 ]]; then
		local l
		l=$("$tmp/bpfstats" -pid "$rpid")
		echo "$(field run_time_ns "$l") $(field run_cnt "$l")"
	else
		echo "0 0"
	fi
}
for mode in keepalive close; do
	wrk_run "$mode" 1 "$hport" "$CONNS" >/dev/null
	wrk_run "$mode" 1 "$rport" "$CONNS" >/dev/null
done
for ((r = 1; r <= ROUNDS; r++)); do
	for mode in keepalive close; do
		order="hash round-robin"
		((r % 2 == 0)) && order="round-robin hash"
		for s in $order; do
			if [[ $s == hash ]]; then port=$hport mp=$hpid; else port=$rport mp=$rpid; fi
			read -r b0 n0 <<<"$(bpf_now)"
			t0=$(tree_ticks "$mp")
			res=$(wrk_cpu "$mode" "$DUR" "$port" "$CONNS")
			t1=$(tree_ticks "$mp")
			read -r b1 n1 <<<"$(bpf_now)"
			[[ $s == round-robin ]] && res="$res bpf_run_ns=$((b1 - b0)) bpf_runs=$((n1 - n0))"
			rps=$(awk '{printf "%.0f", $1 / $2 * 1e6}' <<<"$(field requests "$res") $(field duration_us "$res")")
			# CPU µs per request: the server's (master and workers) plus wrk's.
			us=$(awk '{printf "%.2f", ($1 + $2) * 10000 / $3}' <<<"$((t1 - t0)) $(field wrk_ticks "$res") $(field requests "$res")")
			echo "s_tput round=$r mode=$mode steering=$s rps=$rps cpu_us_per_req=$us server_ticks=$((t1 - t0)) loadavg=$(cut -d' ' -f1 /proc/loadavg) $res" >>"$RAW"
			log "  round $r $mode $s: $rps req/s, $us CPU µs per request"
		done
	done
done
stop_current
}
meta elapsed_s "$(($(date +%s) - start_time))"

# --- report ---------------------------------------------------------------------

AWKF='function f(k,   i) { for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) return substr($i, length(k) + 2); return 0 }
function isort(a, n,   i, j, v) { for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j > 0 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v } }
function med(a, n) { isort(a, n); return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }'

# bal W STEERING: "busiest(median) idlest(median) busiest(max) idlest(min) exact n ratio(median)"
bal() {
	awk -v w="$1" -v s="$2" "$AWKF"'
		$1 == "s_balance" && f("workers") == w && f("steering") == s {
			n++; b[n] = f("busiest") + 0; i[n] = f("idlest") + 0
			if (b[n] > bmax) bmax = b[n]; if (n == 1 || i[n] < imin) imin = i[n]
			if (b[n] - i[n] <= 1) exact++
		}
		END { printf "%s %s %d %d %d %d\n", med(b, n), med(i, n), bmax, imin, exact, n }' "$RAW"
}

# rl_sum MIGRATE MODE STEERING: "reloads failed requests reload_ms_p50(median)"
rl_sum() {
	awk -v m="$1" -v mode="$2" -v s="$3" "$AWKF"'
		$1 == "s_reload" && f("migrate") == m && f("mode") == mode && f("steering") == s {
			rl += f("reloads"); req += f("requests")
			fail += f("err_connect") + f("err_read") + f("err_write") + f("err_status") + f("err_timeout")
			ms[++n] = f("reload_ms_p50") + 0
		}
		END { printf "%d %d %d %s\n", rl, fail, req, n ? med(ms, n) : 0 }' "$RAW"
}

# tput MODE KEY: "hash(median) rr(median) ratio(median of paired) ratio_min ratio_max rounds" of KEY (rps or cpu_us_per_req)
tput() {
	awk -v mode="$1" -v key="$2" "$AWKF"'
		$1 == "s_tput" && f("mode") == mode { r = f("round") + 0; v[r, f("steering")] = f(key) + 0; if (r > R) R = r }
		END {
			for (r = 1; r <= R; r++) if (((r, "hash") in v) && ((r, "round-robin") in v)) {
				n++; h[n] = v[r, "hash"]; o[n] = v[r, "round-robin"]; q[n] = o[n] / h[n]
				if (n == 1 || q[n] < qmin) qmin = q[n]; if (q[n] > qmax) qmax = q[n]
			}
			printf "%.2f %.2f %.3f %.3f %.3f %d\n", med(h, n), med(o, n), med(q, n), qmin, qmax, n
		}' "$RAW"
}

mkdir -p "$OUT"
md=$OUT/benchmarks-steering.md
{
	echo "# Kernel steering: \`--steering round-robin\` against \`--steering hash\`"
	echo
	echo "Generated by \`bench/steering.sh$( ((QUICK)) && echo ' --quick')\` on $(awk '$2 == "date" {print $3}' "$RAW"):"
	echo "$(nproc) CPUs ($(awk -F'cpu_model ' '/^meta cpu_model/ {print $2}' "$RAW")), $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
	echo "(the machine is shared: other jobs ran meanwhile). Built-in Go workers, \`--bind worker\`."
	echo "Raw data: [benchmarks-steering-raw.txt](benchmarks-steering-raw.txt)."
	echo
	echo "## Balance: 16 keep-alive connections"
	echo
	echo "wrk -c16 for 2 s, the established connections of each worker counted (ss) 1 s in; $REP repeats per cell,"
	echo "the two modes alternating against two masters that run side by side."
	echo
	echo "| workers | steering | busiest (median) | idlest (median) | busiest ÷ idlest (medians) | worst busiest / idlest | runs within 1 of even |"
	echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"
	for w in 2 4; do
		for s in hash round-robin; do
			read -r bm im bx imn ex n <<<"$(bal "$w" "$s")"
			q=$(awk -v b="$bm" -v i="$im" 'BEGIN {if (i > 0) printf "%.2f", b / i; else print "∞"}')
			echo "| $w | $s | $bm | $im | $q | $bx / $imn | $ex of $n |"
		done
	done
	echo
	echo "## Reloads under load"
	echo
	echo "4 workers, \`shoal ctl reload\` back to back for $RSECS s minus 3 under wrk ($CONNS connections, 1 thread;"
	echo "wrk never retries: connect, read, write and timeout errors are the failed requests), in a network"
	echo "namespace of its own per run; $RL_ROUNDS rounds, the two modes alternating in each."
	echo
	echo "| tcp_migrate_req | traffic | steering | reloads | failed requests | failed per reload | requests | reload p50 (median) |"
	echo "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"
	if grep -q '^s_reload ' "$RAW"; then
		for mig in 0 1; do
			for mode in close keepalive; do
				for s in hash round-robin; do
					read -r rl fail req ms <<<"$(rl_sum "$mig" "$mode" "$s")"
					per=$(awk -v f="$fail" -v r="$rl" 'BEGIN {if (r) printf "%.2f", f / r; else print "-"}')
					label=$([[ $mode == close ]] && echo "new connection per request" || echo keep-alive)
					echo "| $mig | $label | $s | $rl | $fail | $per | $req | $ms ms |"
				done
			done
		done
	else
		echo "| skipped: needs root, unshare and ip | | | | | | | |"
	fi
	echo
	echo "## Throughput"
	echo
	echo "2 workers each, wrk $CONNS connections, 1 thread, ${DUR} s per run; $ROUNDS rounds, the order alternating;"
	echo "each ratio is the median of round-robin ÷ hash measured in the same round. CPU per request is the"
	echo "CPU time of the master, its workers and wrk over the requests answered (the kernel's work on the"
	echo "connections, the steering program's included, is charged to these processes on loopback)."
	echo
	echo "| traffic | | hash (median) | round-robin (median) | round-robin ÷ hash (median of paired) | range of the paired ratios |"
	echo "| --- | --- | ---: | ---: | ---: | ---: |"
	for mode in keepalive close; do
		label=$([[ $mode == close ]] && echo "new connection per request" || echo keep-alive)
		read -r h o q qmin qmax n <<<"$(tput "$mode" rps)"
		echo "| $label | throughput | $(printf '%.0f' "$h") req/s | $(printf '%.0f' "$o") req/s | **${q}x** | ${qmin}–${qmax} ($n rounds) |"
		read -r h o q qmin qmax n <<<"$(tput "$mode" cpu_us_per_req)"
		echo "| $label | CPU per request | $h µs | $o µs | **${q}x** | ${qmin}–${qmax} ($n rounds) |"
	done
	if grep -q '^meta bpf_stats on' "$RAW"; then
		echo
		echo "The program's own cost, from the kernel's accounting of its run time (BPF_ENABLE_STATS, on during this part):"
		echo
		echo "| traffic | connections placed | program time | per connection | share of the CPU per request |"
		echo "| --- | ---: | ---: | ---: | ---: |"
		for mode in keepalive close; do
			label=$([[ $mode == close ]] && echo "new connection per request" || echo keep-alive)
			awk -v mode="$mode" -v label="$label" "$AWKF"'
				$1 == "s_tput" && f("mode") == mode && f("steering") == "round-robin" {
					ns += f("bpf_run_ns"); runs += f("bpf_runs"); req += f("requests"); cpu += f("cpu_us_per_req") * f("requests")
				}
				END {
					per = runs ? ns / runs : 0
					# share: program time over all CPU time of the runs
					printf "| %s | %d | %.1f ms | %.0f ns | %.3f%% |\n", label, runs, ns / 1e6, per, cpu ? ns / (cpu * 1000) * 100 : 0
				}' "$RAW"
		done
	fi
} >"$md"
cp "$RAW" "$OUT/benchmarks-steering-raw.txt"
log "done in $(($(date +%s) - start_time))s: $md, $OUT/benchmarks-steering-raw.txt"
