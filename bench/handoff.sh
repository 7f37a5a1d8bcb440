#!/usr/bin/env bash
# bench/handoff.sh: --bind master against --bind worker (issue 13), side by
# side in one run on one machine.
#
#   bench/handoff.sh            the full run (about 10 minutes on 2 CPUs)
#   bench/handoff.sh --quick    a short run (about 3 minutes)
#
# 1. Reloads under load: bench/reload-ns.sh, 4 built-in Go workers reloaded
#    back to back under wrk (which never retries), new connection per request
#    and keep-alive, with net.ipv4.tcp_migrate_req=0 and 1, each in a network
#    namespace of its own (root); --bind worker and --bind master alternate
#    within each round. Failed requests per reload.
# 2. Restart: bench/firstserve, time from SIGKILL of a worker to the first
#    request answered on its port (one worker, a fresh master per kill, so
#    every kill meets shoal's immediate restart), and the connections refused
#    or reset meanwhile.
#
# Both use --steering hash, so that only --bind differs (bench/steering.sh
# measures the steering). It writes $BENCH_OUT/benchmarks-handoff.md and
# $BENCH_OUT/benchmarks-handoff-raw.txt (BENCH_OUT defaults to docs).
# Knobs (environment): BENCH_ROUNDS, BENCH_KILLS, BENCH_RELOAD_SECS, BENCH_CONNS
# (wrk connections, 32), SHOAL (a built binary; else it is built), BENCH_KEEP=1.
set -euo pipefail

NAME=handoff
QUICK=0
for a in "$@"; do
	case $a in
	--quick) QUICK=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "bench/handoff.sh: unknown argument $a (want --quick)" >&2
		exit 2
		;;
	esac
done
if ((QUICK)); then
	ROUNDS=${BENCH_ROUNDS:-2} KILLS=${BENCH_KILLS:-10} RSECS=${BENCH_RELOAD_SECS:-8}
else
	ROUNDS=${BENCH_ROUNDS:-4} KILLS=${BENCH_KILLS:-25} RSECS=${BENCH_RELOAD_SECS:-10}
fi
CONNS=${BENCH_CONNS:-32}
BUILD=firstserve
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
meta kills "$KILLS"
meta reload_secs "$RSECS"
meta conns "$CONNS"

# --- 1. reloads under load -------------------------------------------------

if need_netns; then
	log "reloads under load: --bind worker and master, tcp_migrate_req 0 and 1, $ROUNDS rounds of $RSECS s"
	for ((r = 1; r <= ROUNDS; r++)); do
		for mig in 0 1; do
			for mode in close keepalive; do
				binds="worker master"
				((r % 2 == 0)) && binds="master worker"
				for b in $binds; do
					line=$(reload_cell "$mode" "$mig" "$b" hash "$RSECS" "$CONNS")
					echo "h_reload round=$r $line" >>"$RAW"
					log "  round $r migrate=$mig $mode bind=$b: reloads=$(field reloads "$line") failed=$(errors "$line") of $(field requests "$line")"
				done
			done
		done
	done
else
	log "reload scenario skipped: it needs root, unshare and ip (a private network namespace)"
	echo "h_reload_skip reason=needs-root-unshare-ip" >>"$RAW"
fi

# --- 2. restart: SIGKILL to the first served request -------------------------

log "restart: $KILLS kills per bind mode and round, time to the first served request"
for ((r = 1; r <= ROUNDS; r++)); do
	binds="worker master"
	((r % 2 == 0)) && binds="master worker"
	for b in $binds; do
		new_port
		"$tmp/firstserve" -port "$NEW_PORT" -kills "$KILLS" -- "$SHOAL" --workers 1 --port "$NEW_PORT" --host 127.0.0.1 \
			--metrics-addr "" --control "" --migrate-req off --steering hash --bind "$b" --log-format json \
			>"$tmp/logs/fs-$b-$r.out" 2>"$tmp/logs/fs-$b-$r.log" || die "firstserve ($b) failed: $(tail -n 3 "$tmp/logs/fs-$b-$r.log")"
		sed -n 's/^kill [0-9]*: first request served after \([0-9.]*\) ms (\([0-9]*\) refused, \([0-9]*\) reset)$/\1 \2 \3/p' "$tmp/logs/fs-$b-$r.out" |
			while read -r ms rf rs; do echo "h_restart_kill round=$r bind=$b ms=$ms refused=$rf reset=$rs" >>"$RAW"; done
		echo "h_restart round=$r bind=$b $(grep '^FIRSTSERVE ' "$tmp/logs/fs-$b-$r.out" | sed 's/^FIRSTSERVE //')" >>"$RAW"
		log "  round $r bind=$b: $(grep '^FIRSTSERVE ' "$tmp/logs/fs-$b-$r.out")"
	done
done

meta elapsed_s "$(($(date +%s) - start_time))"

# --- report ------------------------------------------------------------------

# rl_sum MIGRATE MODE BIND: "reloads failed requests reload_ms_p50(median)" over the rounds.
rl_sum() {
	awk -v m="$1" -v mode="$2" -v b="$3" '
		function f(k,   i) { for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) return substr($i, length(k) + 2); return 0 }
		function isort(a, n,   i, j, v) { for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j > 0 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v } }
		$1 == "h_reload" && f("migrate") == m && f("mode") == mode && f("bind") == b {
			rl += f("reloads"); req += f("requests")
			fail += f("err_connect") + f("err_read") + f("err_write") + f("err_status") + f("err_timeout")
			ms[++n] = f("reload_ms_p50") + 0
		}
		END { isort(ms, n); printf "%d %d %d %s\n", rl, fail, req, n ? ms[int((n + 1) / 2)] : 0 }' "$RAW"
}

# ks BIND: "p50 p90 max refused reset n" of the pooled kills.
ks() {
	awk -v b="$1" '
		function f(k,   i) { for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) return substr($i, length(k) + 2); return 0 }
		function isort(a, n,   i, j, v) { for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j > 0 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v } }
		$1 == "h_restart_kill" && f("bind") == b { ms[++n] = f("ms") + 0; rf += f("refused"); rs += f("reset") }
		END { if (!n) { print "- - - 0 0 0"; exit } isort(ms, n); printf "%.1f %.1f %.1f %d %d %d\n", ms[int((n + 1) / 2)], ms[int(n * 0.9 + 0.999)], ms[n], rf, rs, n }' "$RAW"
}

mkdir -p "$OUT"
md=$OUT/benchmarks-handoff.md
{
	echo "# Hand-off mode: \`--bind master\` against \`--bind worker\`"
	echo
	echo "Generated by \`bench/handoff.sh$( ((QUICK)) && echo ' --quick')\` on $(awk '$2 == "date" {print $3}' "$RAW"):"
	echo "$(nproc) CPUs ($(awk -F'cpu_model ' '/^meta cpu_model/ {print $2}' "$RAW")), $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
	echo "(the machine is shared: other jobs ran meanwhile). Raw data: [benchmarks-handoff-raw.txt](benchmarks-handoff-raw.txt)."
	echo
	echo "## Reloads under load"
	echo
	echo "4 built-in Go workers, \`shoal ctl reload\` back to back for $RSECS s minus 3 under wrk ($CONNS connections,"
	echo "1 thread; wrk never retries, so every failed request is counted: connect, read, write, timeout errors),"
	echo "in a network namespace of its own per run, \`--steering hash\`; $ROUNDS rounds, the two modes alternating in each."
	echo
	echo "| tcp_migrate_req | traffic | --bind | reloads | failed requests | failed per reload | requests | reload p50 (median) |"
	echo "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"
	if grep -q '^h_reload ' "$RAW"; then
		for mig in 0 1; do
			for mode in close keepalive; do
				for b in worker master; do
					read -r rl fail req ms <<<"$(rl_sum "$mig" "$mode" "$b")"
					per=$(awk -v f="$fail" -v r="$rl" 'BEGIN {if (r) printf "%.2f", f / r; else print "-"}')
					label=$([[ $mode == close ]] && echo "new connection per request" || echo keep-alive)
					echo "| $mig | $label | $b | $rl | $fail | $per | $req | $ms ms |"
				done
			done
		done
	else
		echo "| skipped: needs root, unshare and ip | | | | | | | |"
	fi
	echo
	echo "## Restart: from SIGKILL to the first served request"
	echo
	echo "One built-in Go worker, a fresh master per kill (so each kill meets the immediate restart, not the crash-loop"
	echo "backoff); right after the kill, requests on new connections until one is answered; a refused connection is"
	echo "retried after 1 ms, a reset one at once. $((ROUNDS * KILLS)) kills per mode, $ROUNDS rounds alternating."
	echo
	echo "| --bind | p50 | p90 | max | refused connections | reset connections |"
	echo "| --- | ---: | ---: | ---: | ---: | ---: |"
	for b in worker master; do
		read -r p50 p90 mx rf rs n <<<"$(ks "$b")"
		echo "| $b | $p50 ms | $p90 ms | $mx ms | $rf | $rs |"
	done
	echo
	echo "With \`--bind master\` the slot's socket stays open while its worker is replaced: the first connection"
	echo "waits in its queue and the replacement answers it; with \`--bind worker\` the port has no listener until"
	echo "the replacement binds (connections refused) and what was queued at the dying worker is reset."
} >"$md"
cp "$RAW" "$OUT/benchmarks-handoff-raw.txt"
log "done in $(($(date +%s) - start_time))s: $md, $OUT/benchmarks-handoff-raw.txt"
