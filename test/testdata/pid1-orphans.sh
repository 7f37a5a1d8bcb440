#!/bin/sh
# A worker for test/container_test.go's PID 1 tests. Like a server that
# spawns helpers and forgets them, it leaves orphans behind, then runs until
# SIGTERM.
#   PID1_ORPHANS   orphans that exit 0.2s later (default 3): each one must be
#                  reaped by shoal, PID 1, or it stays a zombie
#   PID1_STRAY=1   one more orphan, in a session of its own, that outlives
#                  the worker: SIGTERM to the worker's process group misses it
#   PID1_STUBBORN  the slot whose worker ignores SIGTERM (SIGKILL after
#                  --stop-timeout)
i=0
while [ "$i" -lt "${PID1_ORPHANS:-3}" ]; do
	(sleep 0.2 &)
	i=$((i + 1))
done
if [ "${PID1_STRAY:-0}" = 1 ]; then
	(setsid sleep 300 &)
fi
if [ "${PID1_STUBBORN:-}" = "$SHOAL_WORKER_ID" ]; then
	trap '' TERM
fi
exec sleep 300
