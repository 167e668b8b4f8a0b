"""The event stream (Events): every state a node's journal writes, numbered, with a token to
resume from; a consumer that reconnects, even to a restarted agent, misses nothing and sees
nothing twice. Two real agents over fake engines (tests/inprocess.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from migctl.agent import certs
from migctl.agent.health import NodeHealth
from migctl.agent.security import server_credentials
from migctl.agent.server import agent_server
from migctl.agent.service import AgentService
from migctl.client import api
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb
from tests.test_phases import DELTA, cluster  # noqa: F401 - the fixture

DESTINATION_STATES = ["requested", "pre-copy", "frozen", "transferring-final", "restoring",
                      "done"]
SOURCE_STATES = ["authorized", "pre-copy", "frozen", "committed", "done"]


def events(cluster, node: str, after: str = "") -> list[pb.NodeEvent]:  # noqa: F811
    with api.AgentClient(cluster.inventory.node(node), cluster.inventory.tls()) as client:
        return list(client.events(after, follow=False))


def move(cluster, source: str, destination: str) -> pb.MigrationReport:  # noqa: F811
    return api.migrate(cluster.inventory, "toy", source, destination, memory_transfer=DELTA)


def test_each_end_tells_every_state_it_journals_in_order(cluster) -> None:  # noqa: F811
    report = move(cluster, "nodeA", "nodeB")
    at_b, at_a = events(cluster, "nodeB"), events(cluster, "nodeA")
    assert [e.state for e in at_b] == DESTINATION_STATES
    assert [e.state for e in at_a] == SOURCE_STATES
    assert [e.kind for e in at_b] == ["started", *["phase"] * 4, "ended"]
    assert {e.migration_id for e in at_a + at_b} == {report.migration_id}
    assert at_b[-1].report.downtime_seconds == report.downtime_seconds > 0
    assert all(e.container == "toy" and e.node == "nodeB" and e.peer == "nodeA" for e in at_b)
    assert [int(e.token) for e in at_b] == sorted(int(e.token) for e in at_b)
    assert events(cluster, "nodeB", at_b[-1].token) == []  # nothing after the last


def restart(cluster, name: str, pki: Path, state: Path) -> None:  # noqa: F811
    """NAME's agent stops and a new one starts on the same state (its journal) and address."""
    cluster.servers[name].stop(grace=None).wait()
    tls = TLSFiles.from_dir(certs.node_dir(pki, name), name)
    service = AgentService(name, cluster.runtimes[name], state / name, tls, registry="",
                           inventory=cluster.path)
    server = agent_server(service, NodeHealth(cluster.runtimes[name]))
    address = cluster.inventory.node(name).address
    assert server.add_secure_port(address, server_credentials(tls))
    server.start()
    cluster.servers[name] = server
    cluster.services[name] = service


def test_a_consumer_resumes_from_its_token_across_an_agent_restart(
        cluster, pki: Path, tmp_path: Path) -> None:  # noqa: F811
    first = move(cluster, "nodeA", "nodeB")
    seen = events(cluster, "nodeB")
    token = seen[-1].token
    restart(cluster, "nodeB", pki, tmp_path)  # the consumer was away meanwhile
    second = move(cluster, "nodeB", "nodeA")  # nodeB is the source this time
    later = events(cluster, "nodeB", token)
    assert [e.state for e in later] == SOURCE_STATES
    assert {e.migration_id for e in later} == {second.migration_id} != {first.migration_id}
    assert int(later[0].token) == int(token) + 1 and not any(e.gap for e in later)
    assert [e.token for e in events(cluster, "nodeB")] == [e.token for e in seen + later]


def test_a_follower_gets_the_events_as_they_are_written(cluster) -> None:  # noqa: F811
    got: list[pb.NodeEvent] = []
    client = api.AgentClient(cluster.inventory.node("nodeB"), cluster.inventory.tls())
    ready = threading.Event()

    def follow() -> None:
        ready.set()
        for e in client.events("", follow=True):
            got.append(e)
            if e.kind == "ended":
                return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    ready.wait(5)
    report = move(cluster, "nodeA", "nodeB")
    reader.join(30)
    client.close()
    assert [e.state for e in got] == DESTINATION_STATES
    # live as in a replay: the container's name, and the ended event's report (the flow
    # journals the end before the report)
    assert {e.container for e in got} == {"toy"}
    assert got[-1].report.downtime_seconds == report.downtime_seconds > 0


@pytest.mark.parametrize("token", ["-1", "abc", "1" * 40, "\u00b2", "999999"])
def test_a_token_that_is_not_the_nodes_is_refused(cluster, token: str) -> None:  # noqa: F811
    """Not a number, or beyond the newest event this node wrote (another node's token, or a
    journal wiped since): refused, not silently empty."""
    with pytest.raises(api.InvalidArgument, match="is not a token of nodeB"):
        events(cluster, "nodeB", token)


def test_the_example_webhook_posts_every_event_once_posted_and_resumes(
        cluster, tmp_path: Path) -> None:  # noqa: F811
    """examples/webhook.py: every event of both nodes reaches the webhook; a consumer started
    again from its state file posts only what came after."""
    import http.server
    import json

    from examples.webhook import Tokens, follow

    posted: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the standard library's name
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    def consume(until: int) -> None:
        tokens, stop = Tokens(tmp_path / "state.json"), threading.Event()
        threads = [threading.Thread(target=follow, daemon=True,
                                    args=(cluster.inventory, n, url, tokens, stop))
                   for n in ("nodeA", "nodeB")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(posted) < until and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()

    try:
        move(cluster, "nodeA", "nodeB")
        consume(len(SOURCE_STATES) + len(DESTINATION_STATES))
        first = len(posted)
        move(cluster, "nodeB", "nodeA")
        consume(first + len(SOURCE_STATES) + len(DESTINATION_STATES))
    finally:
        server.shutdown()
    keys = [(e["node"], e["token"]) for e in posted]
    assert len(keys) == len(set(keys)) == 2 * (len(SOURCE_STATES) + len(DESTINATION_STATES))
    assert sum(e["kind"] == "ended" for e in posted) == 4


def test_status_and_watch_show_both_ends(cluster, capsys) -> None:  # noqa: F811
    """`migctl status ID` prints each end's journal entry; `migctl watch --once` every node's
    migrations under way or ended in the last minute."""
    report = move(cluster, "nodeA", "nodeB")
    assert cluster.cli("status", report.migration_id) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.split()[:4] == ["nodeA", "source", "toy", "done"] for line in out), out
    assert any(line.split()[:4] == ["nodeB", "destination", "toy", "done"] for line in out)
    assert any("downtime" in line for line in out)
    assert cluster.cli("watch", "--once") == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [report.migration_id, "nodeA", "source", "toy", "nodeB", "done"] in \
        [r[:6] for r in rows]
    assert cluster.cli("status", "0123456789abcdef") == 1
    assert "no node of the inventory knows" in capsys.readouterr().err
