"""The page tunnel's two ends on real sockets and processes (agent/dataplane/pages.py), and the
choice between page server and delta (agent/migration/policy.py). The migrations that use them
are in tests/test_faults.py and tests/test_migrate_e2e.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from migctl.agent.dataplane.pages import (
    GUARD,
    Listener,
    PageServer,
    PrivateNetns,
    connect_in,
    criu_peer,
    end_criu,
    processes_in,
    stale_netns,
    stop_lazy_leftovers,
)
from migctl.agent.migration.policy import (
    DELTA,
    PAGE_SERVER,
    PAGE_SERVER_MIN_RATE,
    POST_COPY,
    Link,
    memory_transfer,
)
from migctl.agent.runtime.docker import refuse_new_connections
from migctl.agent.runtime.host import criu_path
from migctl.common.errors import (
    DeltaError,
    FailedPrecondition,
    InvalidArgument,
    RuntimeFailure,
    Unavailable,
)

# connects to the port in argv[1], sends "from-criu", prints what comes back
PEER = ("import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
        "s.sendall(b'from-criu'); s.shutdown(socket.SHUT_WR); "
        "print(s.makefile('rb').read().decode(), flush=True)")
# the same, but it keeps its side open while it waits for the answer, as CRIU does
WAITING_PEER = PEER.replace(" s.shutdown(socket.SHUT_WR);", "")


def peer(listener: Listener, *wrap: str, name: str = "criu", code: str = PEER
         ) -> subprocess.Popen:
    """A process that calls itself NAME and connects to LISTENER, run under WRAP."""
    port = listener.address.rsplit(":", 1)[1]
    return subprocess.Popen([*wrap, "bash", "-c", f'exec -a "{name}" "$0" -c "$1" "$2"',
                             sys.executable, code, port], stdout=subprocess.PIPE, text=True)


def test_a_process_of_this_node_named_criu_is_relayed_both_ways() -> None:
    listener = Listener()
    proc = peer(listener)
    try:
        got = b"".join(listener.relay(iter([b"from-", b"page-server"]), timeout=10))
    finally:
        listener.close()
    assert got == b"from-criu"
    assert proc.communicate(timeout=10)[0].strip() == "from-page-server"
    assert listener.rejected == []


def test_a_process_that_is_not_criu_is_refused_unread() -> None:
    listener = Listener()
    proc = peer(listener, name="python3")
    try:
        with pytest.raises(Unavailable, match="no checkpoint connected"):
            list(listener.relay(iter([b"secret answers"]), timeout=5))
    finally:
        listener.close()
    assert proc.communicate(timeout=10)[0].strip() == "", "it was sent something"
    assert len(listener.rejected) == 1 and "is not this node's CRIU" in listener.rejected[0]


def test_a_container_process_posing_as_criu_is_refused() -> None:
    """Root with the node's network but a mount namespace of its own, as a container with the
    host's network has: its name says criu, and it still gets nothing."""
    listener = Listener()
    proc = peer(listener, "unshare", "--mount", "--propagation", "private")
    try:
        with pytest.raises(Unavailable):
            list(listener.relay(iter([b"secret answers"]), timeout=5))
    finally:
        listener.close()
    assert proc.communicate(timeout=10)[0].strip() == ""
    assert listener.rejected, "the impostor was never seen"


def test_an_aborted_tunnel_stops_waiting_for_criu() -> None:
    """The stream was cancelled (or the destination's hold broke) before CRIU connected: the
    wait ends then, not when its long timeout runs out."""
    listener = Listener()
    ended: list[BaseException] = []

    def wait() -> None:
        try:
            list(listener.relay(iter([]), timeout=600))
        except Unavailable as err:
            ended.append(err)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    listener.abort()
    waiter.join(120)
    listener.close()
    assert ended and "ended before a checkpoint connected" in str(ended[0])


def test_a_broken_stream_cuts_criu_off_instead_of_leaving_it_waiting() -> None:
    """The destination died while CRIU waits for its page server's answer: CRIU's
    connection is shut down, so its dump fails and the source can resume the container."""
    def broken():
        yield b"from-"
        raise RuntimeError("the stream broke")  # as grpc.RpcError: not an OSError

    listener = Listener()
    proc = peer(listener, code=WAITING_PEER)
    try:
        got = b"".join(listener.relay(broken(), timeout=30))
    finally:
        listener.close()
    assert got == b"from-criu"
    assert proc.communicate(timeout=60)[0].strip() == "from-", "CRIU was not cut off"


def test_the_port_stays_bound_while_a_checkpoint_holds_it() -> None:
    """runc may still send CRIU to the port after the stream ended: no other process may
    take it until the checkpoint lets go."""
    listener = Listener()
    port = int(listener.address.rsplit(":", 1)[1])
    assert listener.hold()  # the checkpoint
    listener.close()  # the stream ends
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))
    listener.release()  # the checkpoint ends
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
    assert not listener.hold(), "a closed tunnel was given to a checkpoint"


def test_criu_peer_names_an_address_no_process_holds() -> None:
    assert criu_peer(("127.0.0.1", 1)) == "127.0.0.1:1 is not this node's CRIU"


# stands in for `criu page-server`: takes everything from its --ps-socket and writes nothing
SINK = ("import socket, sys; s = socket.socket(fileno=int(sys.argv[sys.argv.index("
        "'--ps-socket') + 1]))\nwhile s.recv(1 << 20): pass")


def test_a_source_sending_more_pages_than_the_limit_is_cut_off(tmp_path: Path) -> None:
    sink = tmp_path / "criu"
    sink.write_text(f"#!{sys.executable}\n{SINK}\n")
    sink.chmod(0o755)
    server = PageServer(str(sink), tmp_path / "images", tmp_path / "work", limit=1 << 20)
    endless = (b"\0" * (64 << 10) for _ in range(10_000))  # 640 MiB if it were all taken
    answers = threading.Thread(target=lambda: list(server.answers()), daemon=True)
    answers.start()
    server.start(endless)
    with pytest.raises(DeltaError, match="more than the 1048576 B"):
        server.finish(timeout=30)
    assert server.received <= (1 << 20) + (64 << 10)
    assert server.proc.poll() is not None, "the page server still runs"


@pytest.mark.skipif(criu_path() is None, reason="CRIU is installed by scripts/setup.sh")
def test_a_page_server_fed_garbage_fails_the_migration(tmp_path: Path) -> None:
    server = PageServer(criu_path() or "", tmp_path / "images", tmp_path / "work", limit=1 << 30)
    answers = threading.Thread(target=lambda: list(server.answers()), daemon=True)
    answers.start()
    server.start(iter([b"\xff" * 4096] * 16))
    with pytest.raises(RuntimeFailure, match="page server"):
        server.finish(timeout=30)


# listens on every address of its namespace, as CRIU's lazy page server does, and answers
SERVE = ("import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
         "socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 27000)); s.listen(1); "
         "c, _ = s.accept(); c.sendall(b'pages:' + c.recv(64)); c.close()")


@pytest.fixture
def netns():
    ns = PrivateNetns(f"migctl-pc-test-{threading.get_ident() % 100000}")
    yield ns
    ns.remove()


def test_a_lazy_page_server_in_its_namespace_is_reached_from_inside_only(netns) -> None:
    """Post-copy: CRIU's page server listens on every address; in the checkpoint's own
    namespace no container and no process of the host's network can reach it."""
    server = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-c", SERVE])
    try:
        conn = connect_in(netns.path, 27000, give_up=lambda: server.poll() is not None,
                          timeout=30)
        with pytest.raises(OSError):  # from the agent's own network: nothing there
            socket.create_connection(("127.0.0.1", 27000), timeout=1).close()
        conn.sendall(b"get")
        assert conn.recv(64) == b"pages:get"
    finally:
        server.kill()


def test_waiting_for_a_page_server_ends_when_the_checkpoint_failed(netns) -> None:
    with pytest.raises(Unavailable, match="never listened"):
        connect_in(netns.path, 27000, give_up=lambda: True)


def test_a_lazy_tunnel_relays_the_connection_the_checkpoint_attached() -> None:
    listener = Listener(lazy=True)
    assert listener.sock is None and listener.address == ""  # nothing listens
    ours, criu = socket.socketpair()
    threading.Timer(0.1, listener.attach, args=(ours,)).start()
    criu.sendall(b"page-data")
    criu.shutdown(socket.SHUT_WR)
    got = b"".join(listener.relay(iter([b"request"]), timeout=10))
    assert got == b"page-data"
    assert criu.recv(64) == b"request"


def test_an_aborted_lazy_tunnel_stops_waiting_for_the_checkpoint() -> None:
    listener = Listener(lazy=True)
    threading.Timer(0.1, listener.abort).start()
    with pytest.raises(Unavailable):
        listener.accept(timeout=30)


def test_a_criu_nobody_connected_to_is_ended_by_a_connection_not_a_kill(netns) -> None:
    """It waits in accept(): a connection that closes at once ends it (a kill would leave
    the container thawed); stale namespaces are this node's by name."""
    server = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-c", SERVE])
    frozen: list[bool] = []
    assert stale_netns(netns.name) == [netns.path]
    end_criu(netns.path, lambda: server.poll() is None, lambda: frozen.append(True), timeout=30)
    assert server.wait(10) == 0, "it was killed, not ended"
    assert not frozen and not processes_in(netns.path)


@pytest.mark.skipif(criu_path() is None, reason="CRIU is installed by scripts/setup.sh")
def test_a_failed_lazy_daemon_is_reported_and_its_guard_stopped(tmp_path: Path) -> None:
    """No images: the daemon fails. A failure leaves it (and its guard, which keeps its socket
    open) to the caller, who removes the container first; stop() then ends both."""
    server = PageServer(criu_path() or "", tmp_path / "images", tmp_path / "images",
                        limit=1 << 30, lazy=True)
    assert server.pids == []  # launched once the images are there
    with pytest.raises(RuntimeFailure, match="lazy-pages daemon failed"):
        server.launch()
    assert len(server.pids) == 2
    assert server.guard is not None and server.guard.poll() is None
    server.stop()
    assert server.guard.poll() is not None


def test_guards_of_ended_migrations_are_stopped_and_no_others(tmp_path: Path) -> None:
    """An agent that stopped between a post-copy's end and stopping its guard left it."""
    def guard(mid: str, root: Path = tmp_path) -> subprocess.Popen:
        return subprocess.Popen([f"{GUARD} {root / mid / 'checkpoints' / 'final'}", "60"],
                                executable="sleep")

    ended, live, elsewhere = guard("m-ended"), guard("m-live"), guard("m-x", tmp_path / "other")
    try:
        assert stop_lazy_leftovers(tmp_path / "staging", {"m-live"}) == 0  # none under it
        ended.kill()
        ended = guard("m-ended", tmp_path / "staging")
        live = guard("m-live", tmp_path / "staging")
        assert stop_lazy_leftovers(tmp_path / "staging", {"m-live"}) == 1
        assert ended.wait(10) is not None
        assert live.poll() is None and elsewhere.poll() is None
    finally:
        for proc in (ended, live, elsewhere):
            proc.kill()


FAST = Link(rtt=0.001, throughput=PAGE_SERVER_MIN_RATE * 2, load=0.0)
SLOW = Link(rtt=0.001, throughput=PAGE_SERVER_MIN_RATE / 2, load=0.0)


@pytest.mark.parametrize("link,method,criu,asked,want", [
    (FAST, "direct", "/criu", "", PAGE_SERVER),
    (SLOW, "direct", "/criu", "", DELTA),
    (None, "direct", "/criu", "", DELTA),
    (FAST, "engine", "/criu", "", DELTA),
    (FAST, "direct", None, "", DELTA),
    (SLOW, "direct", "/criu", PAGE_SERVER, PAGE_SERVER),
    (FAST, "direct", "/criu", DELTA, DELTA),
    (FAST, "engine", None, DELTA, DELTA),
])
def test_the_link_decides_unless_the_operator_asked(link, method, criu, asked, want) -> None:
    how, why = memory_transfer(link, method, criu, asked)
    assert how == want and why


def at(share: float) -> Link:
    return Link(rtt=0.001, throughput=PAGE_SERVER_MIN_RATE * share, load=0.0)


@pytest.mark.parametrize("share,last,want", [
    (0.74, PAGE_SERVER, DELTA),        # under the band: the link decides, whatever came before
    (1.25, DELTA, PAGE_SERVER),        # above it
    (0.80, PAGE_SERVER, PAGE_SERVER),  # inside: what this link chose before stays
    (1.20, DELTA, DELTA),
    (1.00, "", DELTA),                 # inside, nothing before: the transfer every source can do
    (1.20, "", DELTA),
])
def test_a_link_near_the_threshold_keeps_its_choice(share, last, want) -> None:
    how, why = memory_transfer(at(share), "direct", "/criu", last=last)
    assert how == want, why
    assert f"{share * 800:.0f} Mbit/s" in why and "600-1000 Mbit/s" in why


def test_runs_measuring_both_sides_of_the_threshold_keep_one_transfer() -> None:
    """The lab's unshaped links measured 770-1000 Mbit/s from run to run: one transfer for all."""
    last, seen = "", set()
    for share in (0.97, 1.05, 0.96, 1.2, 0.8, 1.1):
        last, _ = memory_transfer(at(share), "direct", "/criu", last=last)
        seen.add(last)
    assert seen == {DELTA}


def test_the_threshold_is_the_agents_to_set() -> None:
    link = at(1.0)  # 800 Mbit/s
    assert memory_transfer(link, "direct", "/criu", min_rate=PAGE_SERVER_MIN_RATE / 4)[0] == \
        PAGE_SERVER
    how, why = memory_transfer(link, "direct", "/criu", min_rate=PAGE_SERVER_MIN_RATE * 4)
    assert how == DELTA and "2400-4000 Mbit/s" in why


@pytest.mark.parametrize("method,criu,why", [
    ("engine", "/criu", "checkpoints through its engine"),
    ("direct", None, "no CRIU of its own"),
])
def test_a_page_server_asked_for_where_none_can_run_is_refused(method, criu, why) -> None:
    with pytest.raises(FailedPrecondition, match=why):
        memory_transfer(FAST, method, criu, PAGE_SERVER)


def test_an_unknown_memory_transfer_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="'rsync'"):
        memory_transfer(FAST, "direct", "/criu", "rsync")


def test_post_copy_is_never_chosen_unasked() -> None:
    for link in (FAST, SLOW, None):
        assert memory_transfer(link, "direct", "/criu", "")[0] != POST_COPY


def test_post_copy_asked_for_runs_or_is_refused_with_the_reason() -> None:
    assert memory_transfer(SLOW, "direct", "/criu", POST_COPY) == (POST_COPY, "asked for")
    with pytest.raises(FailedPrecondition, match="no post-copy for this migration: nodeA: "
                                                 "fs.pipe-max-size"):
        memory_transfer(FAST, "direct", "/criu", POST_COPY, "nodeA: fs.pipe-max-size is 1")


def test_a_paused_copy_resets_new_connections_until_it_resumes(netns) -> None:
    """Clients that try the paused source first are reset at once instead of waiting for their
    own timeout; after a rollback it takes connections again (and the rule goes once)."""
    server = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-c", SERVE])
    try:
        time.sleep(0.5)  # listening
        refuse_new_connections(netns.path, True)
        refuse_new_connections(netns.path, True)  # once only
        start = time.monotonic()
        with pytest.raises(Unavailable):  # reset, not left waiting
            connect_in(netns.path, 27000, give_up=lambda: True, timeout=5)
        assert time.monotonic() - start < 1
        refuse_new_connections(netns.path, False)
        conn = connect_in(netns.path, 27000, give_up=lambda: server.poll() is not None,
                          timeout=30)
        conn.sendall(b"x")
        assert conn.recv(64) == b"pages:x"
    finally:
        server.kill()
