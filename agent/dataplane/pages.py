"""CRIU's page server traffic, carried between the agents over their mutual TLS.

On a fast link the final checkpoint's memory pages go straight from the source's CRIU to a
`criu page-server` at the destination, with no dump to disk and no delta in the frozen window.
runc gives CRIU a page server only as HOST:PORT, with no TLS options, so that connection never
leaves the source node: the source agent listens on its loopback (`Listener`), takes the one
connection that comes from its own CRIU, and relays it in the PageTunnel stream that the
destination agent opened. The destination (`PageServer`) hands the stream to a page server it
started on one end of a socket pair (`--ps-socket`): nothing listens there at all.

Post-copy reverses the roles. The source's CRIU keeps the pages after its (lazy) checkpoint and
serves them: its page server listens on every address, so runc and CRIU run in a network
namespace the source agent made for this checkpoint (`PrivateNetns`), which only root in the
agent's mount namespace can enter; the agent connects from inside (`connect_in`) and relays that
connection. At the destination a `criu lazy-pages` daemon on a socket pair asks for the pages
the restored process faults on, and pushes the rest (`PageServer(lazy=True)`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil

from migctl.agent.runtime.netns import inside
from migctl.common.errors import DeltaError, RuntimeFailure, Unavailable

log = logging.getLogger(__name__)

RELAY_CHUNK = 1 << 20  # bytes per stream message, as the other streams
ACCEPT_S = 60.0        # how long the source waits for its CRIU to connect
PAGE_SERVER_EXIT_S = 30.0  # how long the page server may take to finish its images
IDLE_S = 60.0          # a relay with no byte from CRIU for this long is cut (CRIU then fails)
LAZY_PORT = 27000      # CRIU's lazy page server, alone in its namespace: any port will do
NETNS_DIR = Path("/run/netns")
GUARD = "migctl-page-guard"  # the guard's argv[0], with the images' folder: found by that


class Listener:
    """The source's end: a loopback port for its own CRIU, relayed to and from a stream.

    Its port stays bound until every holder let go (`hold`/`release`: the tunnel's stream and
    a checkpoint that was given the port): no other process can take the port while runc may
    still send CRIU to it. `abort` ends the relay and any wait at once (shutdown, not close)."""

    def __init__(self, lazy: bool = False) -> None:
        """LAZY: nothing listens; a lazy checkpoint `attach`es its connection to CRIU."""
        self.lazy = lazy
        self.sock: socket.socket | None = None
        self.address = ""
        if not lazy:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(4)
            self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.rejected: list[str] = []  # what connected and was not this node's CRIU
        self.conn: socket.socket | None = None
        self.aborted = False
        self.on_close: Callable[[], object] = lambda: None  # once the last holder let go
        self.netns: Path | None = None  # lazy: where the checkpoint's CRIU serves its pages
        self._attached = threading.Event()
        self._holders = 1  # the tunnel's stream
        self._lock = threading.Lock()

    def attach(self, conn: socket.socket) -> None:
        """A lazy checkpoint's connection to its CRIU page server, for the relay. No idle cut:
        nothing is asked before the destination restored (the tunnel's end cuts it)."""
        conn.settimeout(None)
        with self._lock:
            self.conn = conn
            if self.aborted:
                conn.shutdown(socket.SHUT_RDWR)
        self._attached.set()

    def accept(self, timeout: float = ACCEPT_S,
               trusted: Callable[[tuple[str, int]], str] | None = None) -> socket.socket:
        """The first connection whose peer TRUSTED accepts (by default: a CRIU process of this
        node's root in the agent's own mount namespace); anything else is closed unread. Lazy:
        the connection the checkpoint attached."""
        if self.lazy:
            if not self._attached.wait(timeout) or self.conn is None:
                raise Unavailable("no checkpoint attached its page server to the page tunnel in "
                                  f"{timeout:.0f} s")
            return self.conn
        assert self.sock is not None
        trusted = trusted or criu_peer
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"no checkpoint connected to the page tunnel in {timeout:.0f} s")
            self.sock.settimeout(min(left, 0.5))
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                if self.aborted:
                    raise Unavailable("the page tunnel ended before a checkpoint connected") \
                        from None
                continue
            except OSError as err:  # shut down: the stream ended
                raise Unavailable(f"the page tunnel ended before a checkpoint connected "
                                  f"({err})") from None
            why = trusted(peer)
            if not why:
                conn.settimeout(IDLE_S)
                with self._lock:
                    self.conn = conn
                    if self.aborted:
                        conn.shutdown(socket.SHUT_RDWR)
                return conn
            self.rejected.append(why)
            log.warning("page tunnel: refused a connection: %s", why)
            conn.close()

    def relay(self, incoming: Iterable[bytes], timeout: float = ACCEPT_S,
              trusted: Callable[[tuple[str, int]], str] | None = None) -> Iterator[bytes]:
        """What CRIU sends, as it comes; INCOMING (the page server's answers) goes to CRIU."""
        conn = self.accept(timeout, trusted)
        try:
            yield from _pump(conn, incoming)
        finally:
            conn.close()

    def hold(self) -> bool:
        """One more holder of the port; False when it is already closed or aborted."""
        with self._lock:
            if self._holders == 0 or self.aborted:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        """A holder lets go; the last one closes the port."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.abort()
            if self.sock is not None:
                self.sock.close()
            self.on_close()

    def abort(self) -> None:
        """End the wait for CRIU and the relay now: CRIU's connection and the wait both fail,
        so a checkpoint blocked on either ends (and the source can resume the container)."""
        with self._lock:
            self.aborted = True
            conn = self.conn
        self._attached.set()
        for sock in (self.sock, conn):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.release()


def criu_peer(peer: tuple[str, int]) -> str:
    """Empty when PEER (a loopback address) is a socket of a CRIU process that root runs in this
    agent's mount namespace; else why not. A container's process (even root with the host's
    network) lives in a mount namespace of its own, and cannot pose as this node's CRIU."""
    own_mnt = os.readlink("/proc/self/ns/mnt")
    for proc in psutil.process_iter(["cmdline", "uids"]):
        cmd = proc.info["cmdline"] or []
        # "criu", or the ld.so wrapper's argument; CRIU renames itself "criu: dump ..."
        if not any(Path(arg).name == "criu" or arg.startswith("criu: ") for arg in cmd[:4]):
            continue
        try:
            if proc.info["uids"].real != 0 or \
                    os.readlink(f"/proc/{proc.pid}/ns/mnt") != own_mnt:
                continue
            if any(c.laddr and tuple(c.laddr) == tuple(peer)
                   for c in proc.net_connections(kind="tcp4")):
                return ""
        except (psutil.Error, OSError):
            continue
    return f"{peer[0]}:{peer[1]} is not this node's CRIU"


def netns_prefix(node: str) -> str:
    """The start of NODE's namespace names: a digest, since node names may contain what
    separates them (node "a" must never sweep node "a-b"'s)."""
    return f"migctl-pc-{hashlib.sha256(node.encode()).hexdigest()[:8]}-"


class PrivateNetns:
    """A network namespace of its own for a lazy checkpoint's CRIU (`ip netns`, named NAME):
    only its loopback, up. Its page server there is out of reach of every container and of
    every process of the host's network; the agent enters it to connect."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = NETNS_DIR / name
        self.remove()  # one left by an agent killed mid-checkpoint
        _ip("netns", "add", name)
        try:
            _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Only once nothing runs in it (the caller ended its CRIU)."""
        if self.path.exists():
            remove_netns(self.path)


def processes_in(netns: Path) -> list[psutil.Process]:
    """What runs in NETNS (a lazy checkpoint's runc and CRIU)."""
    try:
        want = f"net:[{netns.stat().st_ino}]"
    except OSError:
        return []
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{proc.pid}/ns/net") == want:
                found.append(proc)
    return found


def stop_criu_in(netns: Path) -> int:
    """Kill what runs in NETNS; returns how many. A last resort (see end_criu)."""
    killed = 0
    for proc in processes_in(netns):
        with contextlib.suppress(psutil.Error):
            proc.kill()
            killed += 1
    return killed


def end_criu(netns: Path, running: Callable[[], bool], freeze: Callable[[], object],
             timeout: float = 60.0) -> None:
    """End a lazy checkpoint's CRIU in NETNS the clean way: a connection that closes at once
    ends its page server (one nobody connected to waits in accept() for ever), and CRIU then
    leaves the container as it found it, paused. Killing it would not: CRIU thaws the tasks
    it holds and re-freezes them only when it exits by itself. So a kill is the last resort,
    after FREEZE froze the container's cgroup again. RUNNING says whether CRIU still runs."""
    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        with contextlib.suppress(Unavailable, OSError):
            connect_in(netns, LAZY_PORT, give_up=lambda: True).close()
        time.sleep(0.05)
    if not running():
        return
    log.error("CRIU in %s did not end: freezing its container, then killing it", netns.name)
    try:
        freeze()
    finally:
        stop_criu_in(netns)


def stale_netns(prefix: str) -> list[Path]:
    """The namespaces named PREFIX*: after a restart, those an agent killed mid-checkpoint left
    (only this node's: agents of a lab share /run/netns)."""
    return sorted(NETNS_DIR.glob(prefix + "*")) if NETNS_DIR.is_dir() else []


def remove_netns(path: Path) -> None:
    with contextlib.suppress(RuntimeFailure):
        _ip("netns", "delete", path.name)


def _ip(*args: str) -> None:
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeFailure(f"ip {' '.join(args)}: {err}") from err
    if out.returncode:
        raise RuntimeFailure(f"ip {' '.join(args)}: {out.stderr.strip()}")


def connect_in(netns: Path, port: int, give_up: Callable[[], bool],
               timeout: float = ACCEPT_S) -> socket.socket:
    """A connection to 127.0.0.1:PORT inside NETNS, made as soon as something listens there
    (CRIU's page server, once its images are written); GIVE_UP ends the wait (the checkpoint
    failed). The socket is made by a thread that entered NETNS, so it belongs to NETNS."""
    def connect() -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.connect(("127.0.0.1", port))
                return sock
            except OSError as err:
                sock.close()
                if err.errno != errno.ECONNREFUSED:
                    raise
            if give_up() or time.monotonic() > deadline:
                raise Unavailable(f"CRIU's page server never listened in {netns.name}")
            time.sleep(0.002)

    return inside(netns, connect, name="page-server-connect")


class PageServer:
    """The destination's end: `criu page-server` writing IMAGES, fed by the tunnel's stream;
    or, LAZY, a `criu lazy-pages` daemon for a restore from IMAGES, asking the source's CRIU for
    the pages the process needs.

    It takes at most LIMIT bytes from the source: a peer that sends more is cut off, and the
    migration fails (the source unpauses its container).

    A lazy daemon that exits closes its userfaultfds, and the process then reads zeros where
    pages had not arrived. So a failure never stops it before the caller removed the container
    (`stop` comes after), and a guard process holds this end of its socket, so that it still
    waits (and the process blocks on a missing page) if this agent dies: the restarted agent
    removes the container, then stops both (agent/migration/recovery.py)."""

    def __init__(self, criu: str, images: Path, work: Path, limit: int,
                 lazy: bool = False) -> None:
        self.images = images
        self.work = work
        self.limit = limit
        self.lazy = lazy
        self.received = 0
        self.error: BaseException | None = None
        self.guard: subprocess.Popen | None = None
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.sock, self._theirs = socket.socketpair()
        self.cancel: Callable[[], object] = lambda: None  # ends the tunnel's stream
        self.on_fail: Callable[[], object] = lambda: None  # lazy: the daemon failed
        self.log_name = "lazy-pages.log" if lazy else "page-server.log"
        self.criu = criu
        self.proc: subprocess.Popen | None = None
        self._stopping = False
        self._done = threading.Event()
        # when the lazy daemon exited (monotonic): every page there, if it exited 0. Read by
        # the report: the flow learns it only after the restore's settle
        self.exited_at: float | None = None
        if not lazy:
            self.launch()

    def launch(self) -> None:
        """Start CRIU (lazy: once the restore's images are here; its socket was ready before,
        so the tunnel could open before the freeze)."""
        ps = str(self._theirs.fileno())
        images, work = str(self.images), str(self.work)
        ready, status = os.pipe() if self.lazy else (-1, -1)
        cmd = ([self.criu, "lazy-pages", "--page-server", "--ps-socket", ps, "--images-dir",
                images, "--work-dir", work, "--status-fd", str(status)] if self.lazy else
               [self.criu, "page-server", "--images-dir", images, "--work-dir", work,
                "--ps-socket", ps])
        try:
            self.proc = subprocess.Popen(
                [*cmd, "-o", self.log_name, "-v2"],
                pass_fds=[self._theirs.fileno()] + ([status] if self.lazy else []),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=self.lazy)
            if self.lazy:
                self.guard = subprocess.Popen(
                    [f"{GUARD} {self.images}", "infinity"], executable=shutil.which("sleep"),
                    pass_fds=[self.sock.fileno()],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            if self.lazy:
                os.close(ready)
            self.stop()
            raise
        finally:
            self._theirs.close()
            if self.lazy:
                os.close(status)
        if self.lazy:
            with contextlib.suppress(OSError):  # the OOM killer spares it (see the class)
                Path(f"/proc/{self.proc.pid}/oom_score_adj").write_text("-1000")
            self._wait_ready(ready)
            threading.Thread(target=self._watch, name="lazy-pages-watch", daemon=True).start()

    def _wait_ready(self, ready: int) -> None:
        """A lazy restore needs the daemon listening when it starts: CRIU writes a byte into
        its status pipe then (the pipe closes unwritten if it fails)."""
        try:
            poller = select.poll()
            poller.register(ready, select.POLLIN)
            got = os.read(ready, 1) if poller.poll(PAGE_SERVER_EXIT_S * 1000) else b""
        finally:
            os.close(ready)
        if got != b"\0":
            assert self.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(PAGE_SERVER_EXIT_S)
            raise RuntimeFailure(f"the lazy-pages daemon failed (exit {self.proc.returncode}): "
                                 f"{self.log_tail()}")

    def _watch(self) -> None:
        """A daemon that fails leaves missing pages to read as zeros: the process must stop at
        once, before any of the flow's rollback (on_fail: a kill, by pid, of the container)."""
        assert self.proc is not None
        code = self.proc.wait()
        self.exited_at = time.monotonic()
        if code != 0 and not self._stopping:
            self.on_fail()

    @property
    def ended(self) -> bool:
        """The tunnel's stream ended (or broke): nothing more comes from the source."""
        return self._done.is_set()

    @property
    def pids(self) -> list[int]:
        """The daemon's and the guard's, for the journal (a restarted agent stops them)."""
        return [p.pid for p in (self.proc, self.guard) if p is not None]

    def answers(self) -> Iterator[bytes]:
        """The page server's answers to CRIU, for the tunnel's request stream."""
        while data := _recv(self.sock):
            yield data

    def feed(self, replies: Iterable[bytes]) -> None:
        """Write what the source's CRIU sent into the page server, until the stream ends."""
        try:
            for data in replies:
                self.received += len(data)
                if self.received > self.limit:
                    raise DeltaError(f"the source sent more than the {self.limit} B of memory "
                                     "pages this checkpoint can hold")
                self.sock.sendall(data)
            if not self.lazy:  # lazy: the daemon says when it has every page; an EOF ends it
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
        except OSError as err:  # it exited: CRIU said why in its log
            self.error = RuntimeFailure(f"the page server stopped taking pages ({err}): "
                                        f"{self.log_tail()}")
            if not self.lazy:
                self.stop()
        except BaseException as err:  # noqa: BLE001 - kept for finish(), said there
            self.error = err
            if not self.lazy:  # lazy: the caller removes the container first, then stops it
                self.stop()
        finally:
            self._done.set()

    def start(self, replies: Iterable[bytes]) -> None:
        threading.Thread(target=self.feed, args=(replies,), name="page-server-feed",
                         daemon=True).start()

    def finish(self, timeout: float = PAGE_SERVER_EXIT_S) -> int:
        """The bytes received, once the stream ended and the page server wrote its images
        (lazy: once the daemon has every page, or failed)."""
        assert self.proc is not None, "finish() of a page server never launched"
        deadline = time.monotonic() + timeout
        while not self._done.wait(0.05):
            if self.lazy and self.proc.poll() is not None:
                break  # the daemon ended (done, or failed): the stream need not
            if time.monotonic() > deadline:
                if not self.lazy:
                    self.stop()
                raise Unavailable(f"the page tunnel did not end within {timeout:.0f} s")
        if self.lazy:
            return self._lazy_finish()
        if self.error is not None:
            raise self.error
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeFailure("the page server did not finish its images") from None
        if code != 0:
            raise RuntimeFailure(f"the page server failed (exit {code}): {self.log_tail()}")
        return self.received

    def _lazy_finish(self) -> int:
        """The daemon's verdict: it exits 0 once every page arrived. A stream that ended
        cleanly leaves it a moment to say so; a broken one is a failure at once."""
        assert self.proc is not None
        try:
            code = self.proc.wait(PAGE_SERVER_EXIT_S if self.error is None else 0.2)
        except subprocess.TimeoutExpired:
            raise self.error or Unavailable("the source ended the page tunnel before every "
                                            "page had arrived") from None
        if code != 0:
            raise RuntimeFailure(f"the lazy-pages daemon failed (exit {code}): "
                                 f"{self.log_tail()}")
        return self.received

    def log_tail(self) -> str:
        try:
            return (self.work / self.log_name).read_text()[-800:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """The page server and the tunnel end now: the source's CRIU fails at once, and the
        source can resume its container."""
        self._stopping = True  # the container is gone (or never ran): no kill to make
        self.cancel()
        self._theirs.close()
        for proc in (self.proc, self.guard):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.sock.close()


def _images_of(cmd: list[str]) -> Path | None:
    """The images' folder of a lazy-pages daemon or guard (from its command line), else None."""
    if cmd and cmd[0].startswith(GUARD + " "):
        return Path(cmd[0][len(GUARD) + 1:])
    if "lazy-pages" in cmd and "--images-dir" in cmd[:-1]:
        return Path(cmd[cmd.index("--images-dir") + 1])
    return None


def _kill_lazy(which: Callable[[Path], bool]) -> int:
    """Kill the lazy-pages daemons and guards whose images' folder WHICH picks; how many."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        images = _images_of(proc.info["cmdline"] or [])
        if images is not None and which(images):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
    return killed


def stop_lazy_leftovers(staging: Path, in_flight: set[str]) -> int:
    """Kill lazy-pages daemons and guards of restores under STAGING whose migration is no
    longer IN_FLIGHT (an agent that stopped after the end left a guard); returns how many."""
    def ended(images: Path) -> bool:
        parts = images.relative_to(staging).parts if images.is_relative_to(staging) else ()
        return len(parts) > 1 and parts[0] not in in_flight
    return _kill_lazy(ended)


def stop_lazy_pages(images: Path) -> int:
    """Kill the lazy-pages daemon and the guard of a restore from IMAGES that a stopped agent
    left (call it once the container is gone); returns how many."""
    return _kill_lazy(lambda found: found == images)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(RELAY_CHUNK)
    except OSError:
        return b""


def _pump(conn: socket.socket, incoming: Iterable[bytes]) -> Iterator[bytes]:
    """CONN's bytes out, INCOMING into CONN (in a thread); ends when CONN closes. Whatever ends
    INCOMING (its end, a broken stream) shuts CONN down: CRIU never waits on a dead tunnel."""
    def down() -> None:
        try:
            for data in incoming:
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except Exception:  # noqa: BLE001 - a broken stream or socket: CRIU must not wait
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    answers = threading.Thread(target=down, name="page-tunnel-down", daemon=True)
    answers.start()
    while True:
        try:
            data = conn.recv(RELAY_CHUNK)
        except TimeoutError:
            raise Unavailable(f"the page tunnel carried nothing for {IDLE_S:.0f} s") from None
        except OSError:
            data = b""
        if not data:
            break
        yield data
    answers.join(PAGE_SERVER_EXIT_S)  # the last answers still reach CRIU before the close
