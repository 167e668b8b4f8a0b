"""Zero trust on the real lab: what a hostile peer tries, and that each attempt is refused.

The attacks of the zero-trust issue, in its order: nodeC holds a valid node certificate and has
no part in any migration of nodeA (1-4); a finished or frozen migration is replayed (5); a
hostile source, holding nodeC's key, serves what an attacker would (6-8); a hostile destination
sends an oversized signature (8). Every refusal is PERMISSION_DENIED or FAILED_PRECONDITION with
a message that says why; nothing is written outside staging; the victim keeps running, alone.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import grpc
import pytest

from migctl.agent import certs
from migctl.agent.dataplane.pages import netns_prefix
from migctl.agent.delta.signature import HEADER, MAGIC, VERSION
from migctl.common.channel import open_channel
from migctl.common.tls import TLSFiles
from migctl.lab.nodes import Lab
from migctl.lab.workloads import ensure_toy_image, remove_everywhere, run_toy
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc
from tests.conftest import CACHE, DELTA, ROOT, LabHandle, migctl
from tests.hostile_source import LEAKS, OUTSIDE
from tests.test_faults import (
    HOOKS,
    finish,
    running_copies,
    start_migration,
    wait_for_line,
)

pytestmark = pytest.mark.lab

REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION)


def stub(lab: LabHandle, node: str, identity: str) -> rpc.AgentStub:
    """A channel to NODE's agent with IDENTITY's certificate (a node's or the operator's)."""
    tls = Lab().tls_dir
    folder = certs.node_dir(tls, identity) if identity.startswith("node") else tls
    return rpc.AgentStub(open_channel(lab.address(node), TLSFiles.from_dir(folder, identity),
                                      server_name=node))


def refused(call, *codes: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert err.value.code() in (codes or REFUSED), (err.value.code(), err.value.details())
    assert err.value.details(), "a refusal says why"
    return err.value


def staging(node: str) -> Path:
    return Lab().node_dir(node) / "agent" / "staging"


@pytest.fixture
def victim(lab: LabHandle) -> Iterator[None]:
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(lab.docker["nodeA"], CACHE)
    run_toy(lab.docker["nodeA"])
    time.sleep(1)
    yield
    assert running_copies(lab) in ([], ["nodeA"], ["nodeB"]), running_copies(lab)
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])


def alone_on_a(lab: LabHandle) -> None:
    time.sleep(1)
    assert running_copies(lab) == ["nodeA"]


# -- 1-4: a node with no part in the migration ---------------------------------------------


def test_1_a_stranger_cannot_snapshot_or_read_volumes(lab: LabHandle, victim: None) -> None:
    a = stub(lab, "nodeA", "nodeC")
    err = refused(lambda: a.SnapshotVolume(pb.SnapshotVolumeRequest(
        migration_id="invented1", volume="testrw"), timeout=10))
    assert "has no migration invented1" in err.details()
    refused(lambda: a.FetchFile(pb.FileRef(migration_id="invented1",
                                           path="volumes/testrw.tar"), timeout=10))
    assert not (staging("nodeA") / "invented1").exists(), "a bogus id left a staging folder"
    alone_on_a(lab)


def test_2_a_stranger_cannot_dump_memory(lab: LabHandle, victim: None) -> None:
    a = stub(lab, "nodeA", "nodeC")
    refused(lambda: a.Begin(pb.BeginRequest(migration_id="invented2", container="toytsm"),
                            timeout=10))
    refused(lambda: a.Checkpoint(pb.CheckpointRequest(
        migration_id="invented2", container="toytsm", name="pre", leave_running=True),
        timeout=10))
    # a migration the operator authorized to nodeB is nodeB's alone
    grant = stub(lab, "nodeA", "client").Authorize(pb.AuthorizeRequest(
        container="toytsm", destination_node="nodeB"), timeout=30)
    err = refused(lambda: a.Begin(pb.BeginRequest(migration_id=grant.migration_id,
                                                  container="toytsm"), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    refused(lambda: a.FetchFile(pb.FileRef(migration_id=grant.migration_id,
                                           path="checkpoints/pre/pages-1.img"), timeout=10))
    assert not list((staging("nodeA") / grant.migration_id).rglob("*.img"))
    alone_on_a(lab)


def test_2_a_page_tunnel_is_the_bound_destinations_alone_and_only_before_the_freeze(
        lab: LabHandle, victim: None) -> None:
    c, b = stub(lab, "nodeA", "nodeC"), stub(lab, "nodeA", "nodeB")

    def tunnel(who: rpc.AgentStub, mid: str, hold: threading.Event | None = None):
        def requests():
            yield pb.PageBytes(migration_id=mid)
            if hold is not None:
                hold.wait(30)
        return who.PageTunnel(requests(), timeout=30)

    err = refused(lambda: tunnel(c, "invented4"), grpc.StatusCode.PERMISSION_DENIED)
    assert "has no migration invented4" in err.details()
    grant = stub(lab, "nodeA", "client").Authorize(pb.AuthorizeRequest(
        container="toytsm", destination_node="nodeB"), timeout=30)
    mid = grant.migration_id
    refused(lambda: tunnel(c, mid), grpc.StatusCode.PERMISSION_DENIED)
    refused(lambda: c.Checkpoint(pb.CheckpointRequest(
        migration_id=mid, container="toytsm", name="final", page_server=True), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED)
    # the bound destination, out of order: no tunnel before Begin...
    refused(lambda: tunnel(b, mid), grpc.StatusCode.FAILED_PRECONDITION)
    b.Begin(pb.BeginRequest(migration_id=mid, container="toytsm"), timeout=30)
    # ...no page server for the pre-copy checkpoint, none without a tunnel...
    refused(lambda: b.Checkpoint(pb.CheckpointRequest(
        migration_id=mid, container="toytsm", name="pre", leave_running=True,
        page_server=True), timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    err = refused(lambda: b.Checkpoint(pb.CheckpointRequest(
        migration_id=mid, container="toytsm", name="final", page_server=True), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert "no page tunnel open" in err.details()
    state = lab.docker["nodeA"].containers.get("toytsm").attrs["State"]
    assert state["Running"] and not state["Paused"], "a refused checkpoint froze it"
    # ...and one tunnel at a time
    hold = threading.Event()
    first = tunnel(b, mid, hold)
    assert next(first).data == b""  # ready
    err = refused(lambda: tunnel(b, mid), grpc.StatusCode.FAILED_PRECONDITION)
    assert "already has a page tunnel open" in err.details()
    first.cancel()
    hold.set()
    b.Release(pb.ReleaseRequest(migration_id=mid, container="toytsm"), timeout=30)
    alone_on_a(lab)


def test_2_lazy_pages_are_served_to_the_bound_destination_alone_and_only_as_asked(
        lab: LabHandle, victim: None) -> None:
    """Post-copy's checkpoint keeps the memory at the source and serves it: a stranger
    cannot open its tunnel; the bound node cannot have it without a lazy tunnel, through a page
    server's tunnel, for "pre", or both ways at once; none of that pauses the container, and a
    lazy tunnel's network namespace goes with it."""
    c, b = stub(lab, "nodeA", "nodeC"), stub(lab, "nodeA", "nodeB")

    def tunnel(who: rpc.AgentStub, mid: str, lazy: bool, hold: threading.Event | None = None):
        def requests():
            yield pb.PageBytes(migration_id=mid, lazy=lazy)
            if hold is not None:
                hold.wait(30)
        return who.PageTunnel(requests(), timeout=30)

    grant = stub(lab, "nodeA", "client").Authorize(pb.AuthorizeRequest(
        container="toytsm", destination_node="nodeB"), timeout=30)
    mid = grant.migration_id
    refused(lambda: tunnel(c, mid, True), grpc.StatusCode.PERMISSION_DENIED)
    refused(lambda: c.Checkpoint(pb.CheckpointRequest(
        migration_id=mid, container="toytsm", name="final", lazy_pages=True), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED)
    b.Begin(pb.BeginRequest(migration_id=mid, container="toytsm"), timeout=30)
    final = pb.CheckpointRequest(migration_id=mid, container="toytsm", name="final",
                                 lazy_pages=True)
    err = refused(lambda: b.Checkpoint(final, timeout=30), grpc.StatusCode.FAILED_PRECONDITION)
    assert "no lazy page tunnel open" in err.details()
    refused(lambda: b.Checkpoint(pb.CheckpointRequest(
        migration_id=mid, container="toytsm", name="pre", leave_running=True, lazy_pages=True),
        timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    err = refused(lambda: b.Checkpoint(pb.CheckpointRequest(
        migration_id=mid, container="toytsm", name="final", lazy_pages=True, page_server=True),
        timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert "not both" in err.details()
    hold = threading.Event()
    plain = tunnel(b, mid, False, hold)  # a page server's tunnel is not a lazy one
    assert next(plain).data == b""
    err = refused(lambda: b.Checkpoint(final, timeout=30), grpc.StatusCode.FAILED_PRECONDITION)
    assert "no lazy page tunnel open" in err.details()
    plain.cancel()
    hold.set()
    state = lab.docker["nodeA"].containers.get("toytsm").attrs["State"]
    assert state["Running"] and not state["Paused"], "a refused checkpoint froze it"
    netns = Path(f"/run/netns/{netns_prefix('nodeA')}{mid[:12]}")
    hold = threading.Event()
    lazy = tunnel(b, mid, True, hold)
    assert next(lazy).data == b""
    assert netns.exists(), "a lazy tunnel has its namespace, made before any freeze"
    lazy.cancel()
    hold.set()
    deadline = time.monotonic() + 10
    while netns.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not netns.exists(), "a closed lazy tunnel left its network namespace"
    b.Release(pb.ReleaseRequest(migration_id=mid, container="toytsm"), timeout=30)
    alone_on_a(lab)


def test_3_a_stranger_cannot_stop_or_delete_a_container(lab: LabHandle, victim: None) -> None:
    a = stub(lab, "nodeA", "nodeC")
    mid = "invented3"
    refused(lambda: a.Begin(pb.BeginRequest(migration_id=mid, container="toytsm"), timeout=10))
    refused(lambda: a.Checkpoint(pb.CheckpointRequest(
        migration_id=mid, container="toytsm", name="final"), timeout=10))
    refused(lambda: a.Commit(pb.CommitRequest(migration_id=mid), timeout=10))
    refused(lambda: a.Release(pb.ReleaseRequest(migration_id=mid, container="toytsm",
                                                completed=True, remove_container=True),
                              timeout=10))
    alone_on_a(lab)


def test_4_secrets_and_roles(lab: LabHandle, victim: None) -> None:
    err = refused(lambda: stub(lab, "nodeA", "nodeC").DescribeContainer(
        pb.ContainerRef(container="toytsm"), timeout=10), grpc.StatusCode.PERMISSION_DENIED)
    assert "operator" not in err.details() or "node" in err.details()
    spec = stub(lab, "nodeA", "client").DescribeContainer(pb.ContainerRef(container="toytsm"),
                                                           timeout=30)
    assert spec.name == "toytsm"
    # a node certificate is no operator's, an operator's is no node's
    refused(lambda: stub(lab, "nodeB", "nodeC").Migrate(pb.MigrateRequest(
        container="toytsm", source_node="nodeA", migration_id="x1"), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED)
    refused(lambda: stub(lab, "nodeA", "nodeC").Authorize(pb.AuthorizeRequest(
        container="toytsm", destination_node="nodeC"), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED)
    refused(lambda: stub(lab, "nodeA", "client").FetchFile(pb.FileRef(
        migration_id="x1", path="volumes/testrw.tar"), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED)
    alone_on_a(lab)


# -- 5: replays ------------------------------------------------------------------------------


def test_5_a_finished_migration_is_never_resumed(lab: LabHandle, victim: None) -> None:
    report = migctl("migrate", "--json", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    mid = __import__("json").loads(report.stdout)["migration_id"]
    for identity in ("nodeB", "client", "nodeC"):
        err = refused(lambda identity=identity: stub(lab, "nodeA", identity).Resume(
            pb.ResumeRequest(migration_id=mid, container="toytsm"), timeout=30))
        if identity == "nodeB":
            assert "is done here" in err.details(), err.details()
    refused(lambda: stub(lab, "nodeA", "nodeB").Begin(pb.BeginRequest(
        migration_id=mid, container="toytsm"), timeout=10))
    time.sleep(1)
    assert running_copies(lab) == ["nodeB"]


def test_1_2_cached_memory_and_volumes_are_served_only_to_a_vouched_destination(
        lab: LabHandle, victim: None) -> None:
    """After A->B, nodeB caches toytsm's checkpoint (its memory) and volume snapshots for later
    migrations. nodeC, with no live migration of that container, asks nodeB for them."""
    report = migctl("migrate", "--json", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    mid = __import__("json").loads(report.stdout)["migration_id"]
    b = stub(lab, "nodeB", "nodeC")
    held = b.Holdings(pb.HoldingsRequest(keys=["svc:toytsm:1:toytsm", "app:toytsm:1"]),
                      timeout=10).holdings
    assert held, "nodeB should hold the checkpoint after the migration"
    for h in held:
        for ref_mid, source in [("", ""), ("invented9", "nodeA"), (mid, "nodeA"),
                                (mid, "nodeB")]:
            err = refused(lambda h=h, ref_mid=ref_mid, source=source: b.FetchHeld(pb.HeldRef(
                key=h.key, timestamp=h.timestamp, migration_id=ref_mid, source_node=source),
                timeout=20), grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
            assert err.details()
    # and Vouch itself: the source vouches for nobody but a live migration's destination
    refused(lambda: stub(lab, "nodeA", "nodeC").Vouch(pb.VouchRequest(
        migration_id=mid, destination_node="nodeB"), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED)


def test_3_a_node_cannot_vouch_for_itself(lab: LabHandle, hostile_c) -> None:
    """nodeC's agent is hostile and vouches for anything; nodeC names itself as the source of a
    made-up migration and asks nodeB for toytsm's cached memory (second red team, 3)."""
    migctl("migrate", "--json", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    hostile_c("final-twice")  # any scenario: its Vouch says yes to everything
    b = stub(lab, "nodeB", "nodeC")
    held = b.Holdings(pb.HoldingsRequest(keys=["svc:toytsm:1:toytsm", "app:toytsm:1"]),
                      timeout=10).holdings
    assert held, "nodeB should hold the checkpoint after the migration"
    for h in held:
        err = refused(lambda h=h: b.FetchHeld(pb.HeldRef(
            key=h.key, timestamp=h.timestamp, migration_id="madeup01", source_node="nodeC"),
            timeout=20), grpc.StatusCode.PERMISSION_DENIED)
        assert "names itself as the source" in err.details(), err.details()
    assert running_copies(lab) == ["nodeB"]


def test_3_vouch_names_no_key_it_was_not_asked_about(lab: LabHandle, victim: None) -> None:
    """During a live migration A->B, nodeC asks nodeA to vouch for nodeB: it learns nothing of
    the container's cache keys (it may only ask about a key it already knows)."""
    with frozen_migration() as (proc, lines, mid):
        c = stub(lab, "nodeA", "nodeC")
        reply = c.Vouch(pb.VouchRequest(migration_id=mid, destination_node="nodeB"), timeout=10)
        assert list(reply.keys) == [], "Vouch listed keys it was not asked about"
        known = "svc:toytsm:1:toytsm"
        reply = c.Vouch(pb.VouchRequest(migration_id=mid, destination_node="nodeB",
                                        keys=[known, "svc:other:1:other", "app:toytsm:1"]),
                        timeout=10)
        # an application's checkpoints (by image) may be another container's: never vouched
        assert list(reply.keys) == [known]
        assert proc.wait(timeout=300) == 0, finish(proc, lines)


@contextlib.contextmanager
def frozen_migration() -> Iterator[tuple[subprocess.Popen, list[str], str]]:
    """A migration A->B of the victim, held by nodeB right after the freeze for 6 s; yields
    the migctl process, its lines and the migration id; nodeB's agent is normal afterwards."""
    Lab().restart_agent("nodeB", ["--test-pause", "transferring-final=6"], HOOKS)
    try:
        proc, lines = start_migration(DELTA)
        wait_for_line(lines, "paused before transferring-final")
        yield proc, lines, _source_migration_id()
    finally:
        Lab().restart_agent("nodeB")


def _source_migration_id(node: str = "nodeA") -> str:
    db = sqlite3.connect(Lab().node_dir(node) / "agent" / "journal.db")
    try:
        row = db.execute("SELECT id FROM migrations WHERE role = 'source' AND state = 'frozen'"
                         ).fetchone()
    finally:
        db.close()
    assert row, "no frozen migration on the source"
    return row[0]


def test_5_a_replayed_begin_does_not_thaw_a_frozen_migration(lab: LabHandle,
                                                             victim: None) -> None:
    with frozen_migration() as (proc, lines, mid):
        b = stub(lab, "nodeA", "nodeB")
        err = refused(lambda: b.Begin(pb.BeginRequest(migration_id=mid, container="toytsm"),
                                      timeout=10), grpc.StatusCode.FAILED_PRECONDITION)
        assert "frozen" in err.details()
        refused(lambda: b.Begin(pb.BeginRequest(migration_id=mid, container="other"),
                                timeout=10), grpc.StatusCode.PERMISSION_DENIED)
        refused(lambda: stub(lab, "nodeA", "nodeC").Commit(pb.CommitRequest(
            migration_id=mid), timeout=10), grpc.StatusCode.PERMISSION_DENIED)
        out = finish(proc, lines)
        assert proc.returncode == 0, out
    time.sleep(1)
    assert running_copies(lab) == ["nodeB"]


# -- 6-8: a hostile source -----------------------------------------------------------------


@pytest.fixture
def hostile_c(lab: LabHandle, victim: None) -> Iterator:
    """nodeC's agent replaced by a hostile one holding nodeC's key, per scenario."""
    lab_ctl = Lab()
    state = lab_ctl.state()
    node = state["nodes"]["nodeC"]
    lab_ctl.stop_pid(node.get("agent_pid"), str(lab_ctl.node_dir("nodeC") / "agent"))
    image = lab.docker["nodeB"].images.get("toytsm:1") if _has_toy(lab) else None
    procs: list[subprocess.Popen] = []
    Path(OUTSIDE).write_text("untouched\n")

    def start(scenario: str) -> None:
        for p in procs:
            p.terminate()
            p.wait(10)
        criu = subprocess.run(["/opt/migctl/bin/criu", "--version"], capture_output=True,
                              text=True).stdout.split("Version:")[-1].split()[0]
        diff_ids = image.attrs["RootFS"]["Layers"] if image else []
        cmd = ["nsenter", "--net=/run/netns/migctl-nodeC", sys.executable, "-m",
               "tests.hostile_source", "--node", "nodeC", "--listen", node["address"],
               "--tls-dir", str(certs.node_dir(lab_ctl.tls_dir, "nodeC")),
               "--scenario", scenario, "--image-id", image.id if image else "sha256:" + "0" * 64,
               "--criu-version", criu, *[a for d in diff_ids for a in ("--diff-id", d)]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT))))
        time.sleep(1.5)

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)
    lab_ctl.restart_agent("nodeC")
    assert Path(OUTSIDE).read_text() == "untouched\n", "an attack wrote outside staging"
    Path(OUTSIDE).unlink()


def _has_toy(lab: LabHandle) -> bool:
    ensure_toy_image(lab.docker["nodeB"], CACHE)
    return True


def from_c(*extra: str) -> subprocess.CompletedProcess[str]:
    res = migctl("migrate", *DELTA, "--mode", "traditional", *extra, "--from", "nodeC",
                 "--to", "nodeB", "toytsm", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    return res


@pytest.mark.parametrize("scenario,why", [
    ("checkpoint-path", "is not a plain file of checkpoint"),
    ("checkpoint-abspath", "is not a plain file of checkpoint"),
    ("volume-name", "invalid volume name"),
    ("hardlink", "has a hostile entry: 'x'"),
    ("oversize", "more than"),
    ("bigdelta", "announces"),
    ("rootfs-xattr", "trusted.overlay.redirect"),
    ("final-path", "is not a plain file of checkpoint"),
    ("changes-escape", "outside the volume"),
    ("changes-escape-folder", "which is not a folder here"),
    ("bomb", "is not a plain tar archive"),
    # the CRIU images are the source's: they may not give the process more than its container
    ("caps", "gives the process AUDIT_CONTROL, AUDIT_READ, BLOCK_SUSPEND"),
    ("caps-pre", "gives the process AUDIT_CONTROL, AUDIT_READ, BLOCK_SUSPEND"),
    ("seccomp", "let kexec_load through"),
    ("mounts", "leaves /proc/sys writable"),
    ("tmpfs", "unpacks to more than 67108864 bytes"),
    ("final-twice", "twice"),
])
def test_6_to_8_a_hostile_source_writes_nothing_outside(lab: LabHandle, hostile_c,
                                                         scenario: str, why: str) -> None:
    hostile_c(scenario)
    res = from_c()
    assert why in res.stderr, res.stderr
    time.sleep(1)
    assert "toytsm" not in [c.name for c in lab.docker["nodeB"].containers.list(all=True)]
    assert "hostilevol" not in [v.name for v in lab.docker["nodeB"].volumes.list()]
    assert not [p for p in staging("nodeB").rglob("*") if p.is_file()
                and p.stat().st_size > 64 << 20], "a hostile stream was written whole"
    assert running_copies(lab) == ["nodeA"]


def test_2_a_hostile_source_gets_no_cached_checkpoint_of_another_container_as_a_basis(
        lab: LabHandle, hostile_c) -> None:
    """toytsm moved A->B, so nodeB caches its checkpoint (its memory and environment) under
    app:toytsm:1. Hostile nodeC describes a container 'evil' of the same image: nodeB must not
    offer that checkpoint as a delta basis (its signature gives its size and hash, and a delta
    that copies it whole would pass; second red team, 2)."""
    migctl("migrate", "--json", *DELTA, "--from", "nodeA", "--to", "nodeB", "toytsm")
    Path(LEAKS).unlink(missing_ok=True)
    hostile_c("cache-basis")
    try:
        migctl("migrate", *DELTA, "--mode", "traditional", "--from", "nodeC", "--to", "nodeB",
               "evil", check=False)
        leaks = Path(LEAKS).read_text() if Path(LEAKS).exists() else ""
        assert leaks == "", f"nodeB offered its cache of toytsm to nodeC: {leaks}"
    finally:
        Path(LEAKS).unlink(missing_ok=True)
        with contextlib.suppress(docker.errors.NotFound):
            lab.docker["nodeB"].containers.get("evil").remove(force=True)
    assert running_copies(lab) == ["nodeB"]


def test_6_a_hostile_source_cannot_choose_host_powers(lab: LabHandle, hostile_c) -> None:
    hostile_c("hostconfig")
    res = from_c("--allow-privileged")
    assert "device /dev/sda" in res.stderr and "bind mount /" in res.stderr, res.stderr
    hostile_c("privileged")
    res = from_c()
    assert "privileged mode" in res.stderr and "--allow-privileged" in res.stderr, res.stderr
    assert "SYS_ADMIN" in res.stderr


def test_6_a_hostile_source_cannot_retag_local_images(lab: LabHandle, hostile_c) -> None:
    b = lab.docker["nodeB"]
    ensure_toy_image(b, CACHE)
    base = [i for i in b.images.list() if "toytsm:1" not in i.tags][0]
    base.tag("victim", "latest")
    hostile_c("tags")
    from_c()
    assert b.images.get("victim:latest").id == base.id, "a peer's tag moved a local image"
    b.images.remove("victim:latest")


def test_6_a_network_internal_to_the_destination_is_not_joined(lab: LabHandle) -> None:
    """A description naming nodeB's internal network (its own services' segment): the
    destination refuses before anything moves, unless the operator allows it."""
    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    remove_everywhere(lab.docker, ["netty"], [])
    for client, internal in ((a, False), (b, True)):
        for n in client.networks.list(names=["db-internal"]):
            n.remove()
        client.networks.create("db-internal", driver="bridge", internal=internal)
    ensure_toy_image(a, CACHE)
    a.containers.run("toytsm:1", ["sleep", "1000"], name="netty", detach=True,
                     network="db-internal")
    try:
        res = migctl("migrate", *DELTA, "--from", "nodeA", "--to", "nodeB", "netty",
                     check=False)
        assert res.returncode == 1 and "an internal network of nodeB" in res.stderr, \
            res.stdout + res.stderr
        assert a.containers.get("netty").status == "running"
        assert "netty" not in [c.name for c in b.containers.list(all=True)]
    finally:
        remove_everywhere(lab.docker, ["netty"], [])
        for client in (a, b):
            for n in client.networks.list(names=["db-internal"]):
                n.remove()


def test_5_silent_calls_of_a_node_key_do_not_starve_the_agent(lab: LabHandle) -> None:
    """nodeC opens 60 streams and 60 unary calls to nodeA's agent and never sends a message:
    the operator's GetNode still answers, and each silent call is cut or refused."""
    import threading

    never = threading.Event()
    codes: list[grpc.StatusCode] = []
    c = stub(lab, "nodeA", "nodeC")
    channel = open_channel(lab.address("nodeA"), TLSFiles.from_dir(
        certs.node_dir(Lab().tls_dir, "nodeC"), "nodeC"), server_name="nodeA")
    silent_unary = channel.stream_unary("/migctl.v1.Agent/GetNode",
                                        request_serializer=pb.GetNodeRequest.SerializeToString,
                                        response_deserializer=pb.NodeInfo.FromString)

    def silence(message):  # noqa: ANN001, ANN202
        never.wait()
        yield message

    def one(call) -> None:  # noqa: ANN001
        try:
            call()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())

    calls = [lambda: list(c.FetchDelta(silence(pb.DeltaRequest()), timeout=120))] * 60 + \
        [lambda: silent_unary(silence(pb.GetNodeRequest()), timeout=120)] * 60
    threads = [threading.Thread(target=one, args=(call,), daemon=True) for call in calls]
    for t in threads:
        t.start()
    time.sleep(1)
    try:
        assert stub(lab, "nodeA", "client").GetNode(pb.GetNodeRequest(), timeout=5).node == \
            "nodeA"
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a silent call held on"
        assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}, \
            codes
    finally:
        never.set()
        channel.close()


# -- 8: a hostile destination ---------------------------------------------------------------


def test_6_authorize_refuses_what_every_destination_refuses(lab: LabHandle,
                                                            tmp_path: Path) -> None:
    """A container whose volume is a host folder (local driver, o=bind): an honest destination
    refuses it, so the source must not authorize it for a destination that would not, and
    would read the folder through SnapshotVolume (second red team, 6)."""
    a = lab.docker["nodeA"]
    remove_everywhere(lab.docker, ["hostfolder"], ["hostbound"])
    folder = tmp_path / "host-folder"
    folder.mkdir()
    (folder / "secret").write_text("the host's\n")
    a.volumes.create("hostbound", driver="local", driver_opts={
        "type": "none", "o": "bind", "device": str(folder)})
    ensure_toy_image(a, CACHE)
    a.containers.run("toytsm:1", ["sleep", "1000"], name="hostfolder", detach=True,
                     volumes={"hostbound": {"bind": "/data", "mode": "rw"}})
    try:
        err = refused(lambda: stub(lab, "nodeA", "client").Authorize(pb.AuthorizeRequest(
            container="hostfolder", destination_node="nodeC"), timeout=30),
            grpc.StatusCode.FAILED_PRECONDITION)
        assert "hostbound" in err.details() and "driver options" in err.details(), \
            err.details()
        assert a.containers.get("hostfolder").status == "running"
    finally:
        remove_everywhere(lab.docker, ["hostfolder"], ["hostbound"])


def test_8_an_oversized_signature_is_refused_at_once(lab: LabHandle, victim: None) -> None:
    grant = stub(lab, "nodeA", "client").Authorize(pb.AuthorizeRequest(
        container="toytsm", destination_node="nodeC"), timeout=30)
    c = stub(lab, "nodeA", "nodeC")
    c.Begin(pb.BeginRequest(migration_id=grant.migration_id, container="toytsm"), timeout=30)
    info = c.SnapshotVolume(pb.SnapshotVolumeRequest(migration_id=grant.migration_id,
                                                     volume="testrw"), timeout=30)
    header = HEADER.pack(MAGIC, VERSION, 0, 0, 8, (1 << 60) * 8, 1 << 60, b"\0" * 16)
    sent = []

    def requests() -> Iterator[pb.DeltaRequest]:
        yield pb.DeltaRequest(target=pb.FileRef(migration_id=grant.migration_id,
                                                path=info.path))
        for _ in range(1024):  # up to 1 GiB, if the source kept reading
            sent.append(1)
            yield pb.DeltaRequest(signature=header + bytes((1 << 20) - len(header)))

    err = refused(lambda: c.FetchDelta(requests(), timeout=60),
                  grpc.StatusCode.FAILED_PRECONDITION)
    assert "announces" in err.details()
    # The source refuses at the header; what the client made meanwhile is what gRPC's flow
    # control let it send before the refusal arrived (its window grows with the link), far
    # from the 1 GiB a source that kept reading would take.
    assert len(sent) < 64, f"the source read {len(sent)} MiB of a signature it should refuse"
    c.Release(pb.ReleaseRequest(migration_id=grant.migration_id, container="toytsm"),
              timeout=30)
    alone_on_a(lab)


# -- secrets at rest --------------------------------------------------------------------------


def test_state_is_private_and_agents_never_hold_the_ca_key(lab: LabHandle) -> None:
    for node in lab.nodes:
        agent = Lab().node_dir(node) / "agent"
        for folder in (agent, agent / "staging", agent / "cache"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        bundle = certs.node_dir(Lab().tls_dir, node)
        assert sorted(p.name for p in bundle.iterdir()) == sorted(
            ["ca.crt", f"{node}.crt", f"{node}.key"])
    assert not (Lab().tls_dir / "ca.key").exists()

