"""A node's engine and CRIU, faked whole (every method of agent.runtime.base.Runtime): containers
with a memory (a dict a checkpoint writes to pages-1.img and a restore reads back), volumes and
writable layers as real folders, checkpoints with CRIU's images as tests/criu_kit.py writes
them. Enough for the phases to run end to end in one process, without a lab."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migctl.agent.runtime.base import ContainerState, Network
from migctl.agent.runtime.criu.images import ENGINE_DEFAULT
from migctl.agent.runtime.criu.seccomp import FLAG_TSYNC
from migctl.common.errors import FailedPrecondition, NotFound, RuntimeFailure
from migctl.proto import migctl_pb2 as pb
from tests import criu_kit as kit

IMAGE_ID = "sha256:" + "1" * 64
LAYER = "sha256:" + "2" * 64


@dataclass
class Container:
    id: str
    spec: pb.ContainerSpec
    upper: Path
    memory: dict[str, Any] = field(default_factory=dict)
    running: bool = False
    paused: bool = False
    policy: dict[str, Any] = field(default_factory=lambda: {"Name": "no"})


@dataclass
class FakeNode:
    """One node's runtime. ROOT holds its volumes and writable layers."""

    root: Path
    method: str = "engine"
    containers: dict[str, Container] = field(default_factory=dict)  # by id
    images: set[str] = field(default_factory=lambda: {IMAGE_ID})
    networks: dict[str, Network] = field(default_factory=dict)  # by name
    fail_restore: str = ""  # a restore fails with this message
    no_kept_connections: str = ""  # why it cannot keep connections ("": it can)
    stall_ping: float = 0.0  # the engine answers a ping this many seconds late (once)
    hook: Callable[[str], None] = lambda call: None  # sees each checkpoint and restore call
    calls: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- what a test sets up --------------------------------------------------------------

    def run(self, name: str, memory: dict[str, Any], files: dict[str, bytes],
            written: dict[str, bytes]) -> Container:
        """A running container NAME of the one image, its volume "data" holding FILES, its
        writable layer WRITTEN."""
        vol = pb.VolumeSpec(name="data", destination="/data")
        spec = pb.ContainerSpec(id=uuid.uuid4().hex * 2, name=name, image="toy:1",
                                image_id=IMAGE_ID, diff_ids=[LAYER], running=True,
                                memory_bytes=1 << 20, volumes=[vol])
        path = self.ensure_volume(vol)
        for rel, data in files.items():
            (path / rel).write_bytes(data)
        c = self._add(spec)
        for rel, data in written.items():
            (c.upper / rel).write_bytes(data)
        c.memory, c.running = dict(memory), True
        return c

    def by_name(self, name: str) -> Container:
        return next(c for c in self.containers.values() if c.spec.name == name)

    def _add(self, spec: pb.ContainerSpec) -> Container:
        cid = spec.id or uuid.uuid4().hex * 2
        spec = pb.ContainerSpec(id=cid, name=spec.name, image=spec.image,
                                image_id=spec.image_id, diff_ids=spec.diff_ids,
                                running=spec.running, memory_bytes=spec.memory_bytes,
                                volumes=spec.volumes, networks=spec.networks,
                                endpoints=spec.endpoints,
                                engine_config_json=spec.engine_config_json)
        upper = self.root / "layers" / cid
        upper.mkdir(parents=True)
        c = self.containers[cid] = Container(cid, spec, upper)
        return c

    def _get(self, container: str) -> Container:
        c = self.containers.get(container) or next(
            (c for c in self.containers.values() if c.spec.name == container), None)
        if c is None:
            raise NotFound(f"no container named {container!r} on this node")
        return c

    # -- facts ----------------------------------------------------------------------------

    def versions(self) -> tuple[str, str, bool]:
        return "20.10.24", "4.2.1", True

    def root_dir(self) -> Path:
        return self.root

    def ping(self) -> None:
        if self.stall_ping:
            stall, self.stall_ping = self.stall_ping, 0.0
            time.sleep(stall)

    def free_bytes(self) -> int:
        return 1 << 40

    def confines_with_seccomp(self) -> bool:
        return True

    # -- containers -----------------------------------------------------------------------

    def inspect(self, container: str) -> dict[str, Any]:
        c = self._get(container)
        return {"Id": c.id, "Name": "/" + c.spec.name, "HostConfig": {},
                "State": {"Running": c.running, "Paused": c.paused}}

    def state(self, container: str) -> ContainerState:
        c = self._get(container)
        return ContainerState(c.id, c.spec.name, c.running, c.paused, 4242 if c.running else 0,
                              tuple(v.name for v in c.spec.volumes))

    def describe(self, container: str) -> pb.ContainerSpec:
        c = self._get(container)
        spec = pb.ContainerSpec()
        spec.CopyFrom(c.spec)
        spec.running = c.running
        return spec

    def list_containers(self) -> list[pb.ContainerSummary]:
        return [pb.ContainerSummary(id=c.id, name=c.spec.name, image=c.spec.image,
                                    running=c.running) for c in self.containers.values()]

    def create_like(self, spec: pb.ContainerSpec, allow_privileged: bool = False,
                    runtime: str = "") -> str:
        self.calls.append(f"create {spec.name}")
        created = pb.ContainerSpec()
        created.CopyFrom(spec)
        created.id = ""
        return self._add(created).id

    def start(self, container: str) -> None:
        self._get(container).running = True

    def running(self, container: str, settle: float = 0.0) -> bool:
        return self._get(container).running

    def port_users(self, created: Iterable[str] = ()) -> dict[tuple[str, str, int], str]:
        return {}

    def wait_running(self, cid: str, on_running: Callable[[], None] = lambda: None,
                     settle: float = 0.0, timeout: float = 0.0) -> None:
        if not self._get(cid).running:
            raise RuntimeFailure(f"{cid[:12]} does not run")
        on_running()

    def remove(self, container: str) -> None:
        self.calls.append(f"remove {self._get(container).spec.name}")
        del self.containers[self._get(container).id]

    def gone(self, container: str) -> bool:
        try:
            self._get(container)
        except NotFound:
            return True
        return False

    def logs(self, container: str) -> Iterator[str]:
        return iter(())

    def restart_policy(self, container: str) -> dict[str, Any]:
        return dict(self._get(container).policy)

    def set_restart_policy(self, container: str, policy: dict[str, Any]) -> None:
        self._get(container).policy = dict(policy)

    def upper_dir(self, container: str) -> Path | None:
        return self._get(container).upper

    # -- checkpoints ----------------------------------------------------------------------

    def method_for(self, container: str) -> str:
        return self.method

    def post_copy_problem(self) -> str:
        return "its engine cannot restore memory pages lazily"

    def kept_connections_problem(self) -> str:
        return self.no_kept_connections

    def checkpoint(self, container: str, name: str, directory: Path, leave_running: bool,
                   page_server: str = "", lazy_in: Path | None = None, *,
                   before_final: bool = False, keep_connections: bool = False) -> Path:
        c = self._get(container)
        self.calls.append(f"checkpoint {name}" + (" keeping connections" if keep_connections
                                                  else ""))
        self.hook(f"checkpoint {name}")
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        core = kit.core_entry(set(ENGINE_DEFAULT), 2, 0, "toy", leader=True)
        for rel, data in {
                "pages-1.img": json.dumps(c.memory).encode(),
                "inventory.img": b"inventory", "core-1.img": kit.core_image(core),
                "pstree.img": kit.pstree_image({1: [1]}), "ids-1.img": kit.ids_image(),
                "seccomp.img": kit.seccomp_image((kit.deny(), FLAG_TSYNC)),
                "mountpoints-12.img": kit.mounts_image(*kit.container_mounts())}.items():
            (folder / rel).write_bytes(data)
        if not leave_running:
            c.running = False
        return folder

    def pause(self, container: str) -> None:
        self._get(container).paused = True

    def unpause(self, container: str) -> None:
        self._get(container).paused = False

    def refuse_connections(self, container: str, refuse: bool) -> None:
        pass

    def isolate(self, container: str, isolated: bool) -> None:
        self.calls.append(f"{'isolate' if isolated else 'reconnect'} "
                          f"{self._get(container).spec.name}")

    def freeze(self, container: str) -> None:
        self._get(container).paused = True

    def kill(self, container: str) -> None:
        self._get(container).running = False

    def start_from_checkpoint(self, cid: str, checkpoint_dir: Path, name: str,
                              lazy_in: Path | None = None,
                              keep_connections: bool = False) -> None:
        c = self._get(cid)
        self.calls.append(f"restore {c.spec.name}" + (" keeping connections"
                                                      if keep_connections else ""))
        self.hook(f"restore {c.spec.name}")
        if self.fail_restore:
            raise RuntimeFailure(self.fail_restore)
        c.memory = json.loads((checkpoint_dir / "pages-1.img").read_text())
        c.running = True

    # -- images and layers ----------------------------------------------------------------

    def image_id(self, ref: str) -> str:
        if ref not in (IMAGE_ID, "toy:1") or IMAGE_ID not in self.images:
            raise NotFound(f"no image {ref!r} on this node")
        return IMAGE_ID

    def has_image(self, image_id: str) -> bool:
        return image_id in self.images

    def missing_layers(self, diff_ids: list[str]) -> list[str]:
        return [] if IMAGE_ID in self.images else list(diff_ids)

    def held_layers(self) -> set[str]:
        return {LAYER} if IMAGE_ID in self.images else set()

    def image_with_layer(self, diff_id: str) -> str:
        if diff_id not in self.held_layers():
            raise NotFound(f"no image holds layer {diff_id}")
        return IMAGE_ID

    def save_image(self, image: str, dest: Path) -> None:
        raise FailedPrecondition("this fake engine holds its one image and moves none")

    def load_image(self, archive: Path) -> None:
        raise FailedPrecondition("this fake engine holds its one image and moves none")

    def ensure_tag(self, image_id: str, ref: str) -> str:
        return ref

    # -- volumes --------------------------------------------------------------------------

    def volume_exists(self, name: str) -> bool:
        return (self.root / "volumes" / name).is_dir()

    def volume_path(self, name: str) -> Path:
        if not self.volume_exists(name):
            raise NotFound(f"no volume {name!r} on this node")
        return self.root / "volumes" / name

    def ensure_volume(self, spec: pb.VolumeSpec) -> Path:
        path = self.root / "volumes" / spec.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_volume(self, name: str) -> None:
        self.calls.append(f"remove volume {name}")
        path = self.volume_path(name)
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        path.rmdir()

    def volume_users(self, name: str) -> list[ContainerState]:
        return [self.state(c.id) for c in self.containers.values()
                if name in (v.name for v in c.spec.volumes)]

    # -- networks -------------------------------------------------------------------------

    def network(self, name: str) -> Network | None:
        net = self.networks.get(name)
        if net is None:
            return None
        used = tuple(e.ipv4 for c in self.containers.values() for e in c.spec.endpoints
                     if e.network == name)
        return dataclasses.replace(net, used=used)

    def internal_networks(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.networks and self.networks[n].internal]
