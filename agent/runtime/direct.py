"""The direct checkpoint path: CRIU's images skip the engine's copies of them.

`docker checkpoint create` and `docker start --checkpoint` pass every image file through
containerd's content store in ~32 KB requests, about 0.8 s + 28 ms per MB each way (measured
in ../shared/HOST.md), while runc and CRIU themselves take about 0.3 s and 0.6 s. On a node
whose engine runs containers through `migctl-runc` (a runc wrapper registered as an engine
runtime), the agent stages a request naming its own folder, the wrapper points runc's
`--image-path` there, and the engine moves an empty checkpoint. Docker still manages the
container: `ps`, `logs`, `exec`, `stop`, `start` and `rm` behave as usual.

A container the engine runs with plain runc (created before the wrapper was installed) takes
the engine's path, as on a node without the wrapper.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from migctl.agent.runtime.host import criu_path
from migctl.agent.runtime.spec import valid_container_id
from migctl.common.errors import RuntimeFailure

if TYPE_CHECKING:
    from migctl.agent.runtime.docker import DockerRuntime

log = logging.getLogger(__name__)

DIRECT_RUNTIME = "migctl"
"""The name the wrapper is registered under in the engine's `runtimes`."""
WRAPPER = Path(__file__).with_name("migctl-runc")
REQUEST_DIR = Path(os.environ.get("MIGCTL_RUNC_DIR", "/run/migctl/runc"))
"""Where the agent stages requests for the wrapper (the wrapper's MIGCTL_RUNC_DIR default)."""
INVENTORY = "inventory.img"  # every CRIU dump has one


def wrapper_runtime(info: dict) -> str:
    """The name under which the engine runs migctl-runc, or "" when it does not."""
    for name, runtime in (info.get("Runtimes") or {}).items():
        if Path(runtime.get("path") or "").name == WRAPPER.name:
            return name
    return ""


@contextlib.contextmanager
def staged(container_id: str, action: str, images: Path, page_server: str = "",
           lazy: bool = False, place: Path | None = None,
           keep_connections: bool = False) -> Iterator[None]:
    """While inside, the wrapper sends CONTAINER_ID's ACTION (checkpoint/restore) to IMAGES;
    LAZY keeps (or fetches) the memory pages through CRIU's lazy pages; PLACE is, for a lazy
    checkpoint, the network namespace runc and CRIU run in (its page server listens there),
    for a lazy restore its work folder (the lazy-pages daemon's socket is there);
    KEEP_CONNECTIONS has CRIU carry established TCP connections instead of closing them."""
    if not valid_container_id(container_id):
        raise RuntimeFailure(f"not a container id: {container_id!r}")
    REQUEST_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    request = REQUEST_DIR / f"{container_id}.{action}"
    tmp = request.with_suffix(".part")
    tmp.write_text(f"{images}\n{page_server}\n{token()}\n{'lazy' if lazy else ''}\n"
                   f"{place or ''}\n{'keep' if keep_connections else ''}\n")
    os.replace(tmp, request)
    try:
        yield
    finally:
        request.unlink(missing_ok=True)


PIPE_MAX_FOR_CRIU = 4 << 20
"""CRIU's lazy page server sizes its pipes to this; beyond fs.pipe-max-size that takes
CAP_SYS_RESOURCE, and without it CRIU's first page read fails (scripts/setup.sh raises it)."""
CAP_SYS_RESOURCE = 24


def pipe_size_problem() -> str:
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    status = Path("/proc/self/status").read_text()
    caps = int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("CapEff:")), 16)
    if limit >= PIPE_MAX_FOR_CRIU or caps >> CAP_SYS_RESOURCE & 1:
        return ""
    return (f"fs.pipe-max-size is {limit} and CRIU's lazy page server needs "
            f"{PIPE_MAX_FOR_CRIU} without CAP_SYS_RESOURCE (scripts/setup.sh raises it)")


@functools.cache
def uffd_problem() -> str:
    """Whether this kernel lets CRIU restore pages lazily (checked once: it does not change)."""
    criu = criu_path()
    if criu is None:
        return "this node has no CRIU of its own"
    if shutil.which("ip") is None:
        return "this node has no ip (iproute2) for a checkpoint's network namespace"
    out = subprocess.run([criu, "check", "--feature", "uffd-noncoop"], capture_output=True,
                         text=True, check=False, timeout=60)
    if out.returncode:
        return "CRIU finds no non-cooperative userfaultfd in this kernel"
    return ""


RUNC_CONF = Path("/etc/criu/runc.conf")
"""runc's CRIU configuration, read after every option runc gives CRIU: an option there holds
for every checkpoint and restore of the machine."""


def runc_conf_problem(conf: Path = RUNC_CONF) -> str:
    """Why the machine's CRIU configuration keeps a call from carrying TCP connections: the
    wrapper gives CRIU `tcp-close` per call (CRIU_CONFIG_FILE), which runc.conf would
    override for all; without `tcp-established` there, no connection is dumped at all."""
    try:
        lines = {line.strip() for line in conf.read_text().splitlines()}
    except OSError:
        lines = set()
    if "tcp-close" in lines:
        return (f"{conf} has tcp-close, which closes every container's connections at every "
                "restore (scripts/setup.sh moves it into migctl-runc, per call)")
    if "tcp-established" not in lines:
        return f"{conf} has no tcp-established: CRIU refuses to dump a connection"
    return ""


@functools.cache
def tcp_repair_problem() -> str:
    """Whether this kernel lets CRIU put a TCP socket in repair mode (checked once)."""
    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except OSError as err:
            return f"the kernel refuses TCP repair mode ({err.strerror})"
    return ""


TCP_REPAIR = 19  # linux/tcp.h


def token() -> str:
    """Unique content for the engine's checkpoint folder (see migctl-runc)."""
    return uuid.uuid4().hex


class WrapperPath:
    """How checkpoints travel where the engine runs a container with migctl-runc: straight to
    staging. Composed into the node's DockerRuntime (its `direct`), which asks it for the
    containers it runs and takes the engine's path for the others."""

    method = "direct"

    def __init__(self, runtime_name: str = DIRECT_RUNTIME) -> None:
        self.runtime_name = runtime_name

    def runs(self, inspected: dict) -> bool:
        """Whether the engine runs this container through the wrapper."""
        return inspected["HostConfig"].get("Runtime") == self.runtime_name

    def sweep_requests(self, engine: DockerRuntime) -> int:
        """Remove the requests an agent killed mid-call left for this engine's containers:
        one would send a later checkpoint of the container (an operator's own) to an old
        folder, or its memory to a loopback port anyone may hold by now. Other engines'
        requests (nodes of a lab share the folder) are theirs."""
        removed = 0
        for c in engine._call("list containers", engine.api.containers, all=True, quiet=True):
            for action in ("checkpoint", "restore"):
                request = REQUEST_DIR / f"{c['Id']}.{action}"
                if request.exists():
                    request.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.warning("removed %d stale request(s) for %s from %s", removed, WRAPPER.name,
                        REQUEST_DIR)
        return removed

    @staticmethod
    def post_copy_problem() -> str:
        return uffd_problem() or pipe_size_problem()

    @staticmethod
    def kept_connections_problem() -> str:
        return tcp_repair_problem() or runc_conf_problem()

    def checkpoint(self, engine: DockerRuntime, cid: str, name: str, directory: Path,
                   leave_running: bool, page_server: str = "", lazy_in: Path | None = None,
                   *, before_final: bool = False, keep_connections: bool = False) -> Path:
        """With PAGE_SERVER (HOST:PORT), CRIU sends the memory pages there, and the folder
        holds every other image. With LAZY_IN (a network namespace's file), CRIU instead keeps
        the pages and serves them from PAGE_SERVER's port in that namespace, and this returns
        only once they were all served (post-copy: the images are complete before that)."""
        target = directory / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        engine_dir = directory / f".engine-{name}"
        shutil.rmtree(engine_dir, ignore_errors=True)
        try:
            with staged(cid, "checkpoint", target, page_server, lazy_in is not None, lazy_in,
                        keep_connections):
                engine.engine_checkpoint(cid, name, engine_dir, leave_running,
                                         serving=lazy_in is not None,
                                         before_final=before_final)
            if not (target / INVENTORY).exists():
                if page_server or keep_connections:  # the pages went nowhere, or CRIU
                    # closed the connections: the checkpoint is no use
                    raise RuntimeFailure(f"{WRAPPER.name} did not take the checkpoint of "
                                         f"{cid[:12]}: is its request folder {REQUEST_DIR}?")
                # the wrapper did not see the request (another MIGCTL_RUNC_DIR?): the images
                # went the engine's way, and are moved where they were expected
                shutil.rmtree(target)
                os.replace(engine_dir / name, target)
                log.warning("the checkpoint of %s went through the engine: is %s's request "
                            "folder %s?", cid[:12], WRAPPER.name, REQUEST_DIR)
        finally:
            shutil.rmtree(engine_dir, ignore_errors=True)
        return target

    def start_from_checkpoint(self, engine: DockerRuntime, cid: str, checkpoint_dir: Path,
                              name: str, lazy_in: Path | None = None,
                              keep_connections: bool = False) -> None:
        """LAZY_IN: a lazy-pages daemon waits in that folder (agent/dataplane/pages.py), and
        the process starts before its memory arrived."""
        # The engine wants a checkpoint folder of its own to exist; the images stay where they
        # were staged and are read by CRIU from there.
        target = engine.root_dir() / "containers" / cid / "checkpoints" / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        (target / "migctl-direct").write_text(token())  # content of its own (migctl-runc)
        try:
            with staged(cid, "restore", checkpoint_dir.resolve(), lazy=lazy_in is not None,
                        place=lazy_in, keep_connections=keep_connections):
                engine.engine_start_checkpoint(cid, name)
        finally:
            shutil.rmtree(target, ignore_errors=True)
