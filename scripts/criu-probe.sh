#!/usr/bin/env bash
# criu-probe.sh CRIU_BINARY
#
# Proves that a CRIU binary really works on the running kernel:
#   1. `criu check`
#   2. a real dump of a detached process that holds a listening TCP socket
#      (this is what Debian 12's criu 3.17 and CRIU 4.1 fail at on kernel 6.x)
#   3. a restore of that dump, then checks that the restored process exists,
#      still owns its listening socket and accepts a connection on it.
# Kills exactly the processes it started (probe process, restored process)
# and removes its temporary directory.
#
# Exit 0 only when check, dump and restore all succeeded. On failure the
# last lines of the relevant CRIU log are printed to stderr.
# Output: one line "criu-probe: OK ..." or "criu-probe: FAIL <stage>: ...".
set -euo pipefail

CRIU=${1:-}
if [[ -z "$CRIU" ]]; then
    echo "usage: $0 CRIU_BINARY" >&2
    exit 2
fi
if [[ "$CRIU" != */* ]]; then
    CRIU=$(command -v -- "$CRIU" || true)
fi
if [[ -z "$CRIU" || ! -x "$CRIU" ]]; then
    echo "criu-probe: FAIL setup: '${1}' is not an executable file" >&2
    exit 2
fi
if [[ $EUID -ne 0 ]]; then
    echo "criu-probe: FAIL setup: must run as root (CRIU needs it)" >&2
    exit 2
fi

PY=/usr/bin/python3
[[ -x "$PY" ]] || PY=$(command -v python3 || true)
if [[ -z "$PY" ]]; then
    echo "criu-probe: FAIL setup: python3 not found (needed for the probe process)" >&2
    exit 2
fi

WORK=$(mktemp -d /tmp/criu-probe.XXXXXX)
IMG="$WORK/img"
mkdir -p "$IMG"
MARKER="criu-probe-marker-$$-$RANDOM$RANDOM"
PROBE_PID=""
START_NS=$(date +%s%N)

# True when PID is alive (not a zombie) and its command line carries our marker:
# guarantees we only ever signal the process we started (or its restored copy).
is_ours() {
    local pid=$1 state
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    [[ "$state" != "Z" && -n "$state" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$MARKER"
}

kill_ours() {
    local pid=$1 i
    is_ours "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        is_ours "$pid" || return 0
        sleep 0.1
    done
    is_ours "$pid" && kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    kill_ours "$PROBE_PID"
    rm -rf -- "$WORK"
}
trap cleanup EXIT

fail() { # fail STAGE MESSAGE [LOGFILE]
    echo "criu-probe: FAIL $1: $2" >&2
    if [[ -n "${3:-}" && -s "$3" ]]; then
        echo "---- last lines of $(basename "$3") ----" >&2
        grep -v '^$' "$3" | tail -n 25 >&2 || true
        echo "----" >&2
    fi
    exit 1
}

VERSION=$("$CRIU" --version 2>/dev/null | awk '/^Version:/{print $2; exit}' || true)
VERSION=${VERSION:-unknown}

# 1. criu check ---------------------------------------------------------------
if ! "$CRIU" check >"$WORK/check.log" 2>&1; then
    fail "check" "'$CRIU check' failed (criu $VERSION)" "$WORK/check.log"
fi

# 2. a detached process holding a listening TCP socket --------------------------
# setsid: own session and process group, stdio on /dev/null, so no --shell-job
# is needed and the dump is of a self-contained process tree.
# A child of this shell (so the shell reaps it at once after the dump), disowned
# so bash prints no "Killed" job notice when criu dump kills it.
setsid "$PY" -c '
import os, socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write("%d %d\n" % (os.getpid(), s.getsockname()[1]))
os.rename(tmp, sys.argv[1])
while True:
    try:
        c, _ = s.accept()
        c.sendall(b"probe-alive\n")
        c.close()
    except OSError:
        time.sleep(0.1)
' "$WORK/info" "$MARKER" </dev/null >/dev/null 2>&1 &
disown $!

for ((i = 0; i < 100; i++)); do
    [[ -s "$WORK/info" ]] && break
    sleep 0.05
done
[[ -s "$WORK/info" ]] || fail "start" "probe process did not come up"
read -r PROBE_PID PORT <"$WORK/info"
is_ours "$PROBE_PID" || fail "start" "probe process $PROBE_PID vanished"

# 3. dump (kills the process once its state is saved) --------------------------
if ! "$CRIU" dump -t "$PROBE_PID" -D "$IMG" -o dump.log -v4 --tcp-established \
        >"$WORK/dump.out" 2>&1; then
    cat "$WORK/dump.out" >>"$IMG/dump.log" 2>/dev/null || true
    fail "dump" "'criu dump' of a process with a listening TCP socket failed (criu $VERSION)" \
        "$IMG/dump.log"
fi
# Wait until the dumped process is gone and reaped: restore needs its PID free.
for ((i = 0; i < 100; i++)); do
    [[ -e "/proc/$PROBE_PID" ]] || break
    sleep 0.1
done
if is_ours "$PROBE_PID"; then
    fail "dump" "process $PROBE_PID still running after dump" "$IMG/dump.log"
fi
if [[ -e "/proc/$PROBE_PID" ]]; then
    fail "dump" "PID $PROBE_PID still taken after dump; cannot restore it" "$IMG/dump.log"
fi

# 4. restore (detached: criu exits, the restored process keeps running) --------
if ! "$CRIU" restore -D "$IMG" -o restore.log -v4 -d --tcp-established \
        --pidfile "$WORK/restored.pid" >"$WORK/restore.out" 2>&1; then
    cat "$WORK/restore.out" >>"$IMG/restore.log" 2>/dev/null || true
    fail "restore" "'criu restore' failed (criu $VERSION)" "$IMG/restore.log"
fi
RESTORED_PID=$(tr -dc '0-9' <"$WORK/restored.pid" 2>/dev/null || true)
[[ -n "$RESTORED_PID" ]] || fail "restore" "criu wrote no pidfile" "$IMG/restore.log"
PROBE_PID=$RESTORED_PID # from now on cleanup() kills the restored process
is_ours "$PROBE_PID" || fail "restore" "restored process $RESTORED_PID is not running" \
    "$IMG/restore.log"

# 5. the restored process still listens on its port and answers -----------------
if ! ss -Hltnp "sport = :$PORT" 2>/dev/null | grep -q "pid=$RESTORED_PID,"; then
    fail "verify" "restored process $RESTORED_PID does not hold a listening socket on 127.0.0.1:$PORT" \
        "$IMG/restore.log"
fi
ANSWER=$("$PY" -c '
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
c.settimeout(5)
print(c.recv(64).decode().strip())
' "$PORT" 2>&1 || true)
if [[ "$ANSWER" != "probe-alive" ]]; then
    fail "verify" "restored process did not answer on 127.0.0.1:$PORT (got: ${ANSWER:-nothing})"
fi

kill_ours "$PROBE_PID"
END_NS=$(date +%s%N)
printf 'criu-probe: OK criu %s (%s): check, dump + restore of a listening TCP socket (pid %s, port %s) in %d ms\n' \
    "$VERSION" "$CRIU" "$RESTORED_PID" "$PORT" $(((END_NS - START_NS) / 1000000))
exit 0
