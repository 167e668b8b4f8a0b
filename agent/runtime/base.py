"""What the migration asks of a node's container runtime, and which runtime a node gets.

One implementation, `DockerRuntime` (agent/runtime/docker.py), with two ways for checkpoints
composed into it: through the Engine API, or `WrapperPath` (agent/runtime/direct.py), which
keeps CRIU's images out of the engine's copies where the engine runs migctl-runc. The
migration flow only sees this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from migctl.common.errors import MigctlError
from migctl.proto import migctl_pb2 as pb


def restarts(policy: dict[str, Any]) -> bool:
    """Whether a restart policy would have the engine start the container again ("no" and the
    engine's own empty default would not)."""
    return (policy.get("Name") or "no") != "no"


@dataclass(frozen=True)
class ContainerState:
    """A container as a migration reads it (never the engine's inspect dictionary)."""

    id: str
    name: str
    running: bool = False
    paused: bool = False
    pid: int = 0  # its first process on this host, while it runs
    volumes: tuple[str, ...] = ()  # the named volumes it mounts


MOVING_DRIVERS = ("macvlan", "ipvlan")
"""Network drivers whose addresses can move between nodes: every node's network of that name
is the same segment (a parent interface on one LAN), not a bridge of its own."""


@dataclass(frozen=True)
class Network:
    """A network of this node's engine, as a migration reads it."""

    name: str
    driver: str
    subnets: tuple[str, ...] = ()  # IPv4 CIDRs
    ip_ranges: tuple[str, ...] = ()  # where the engine gives addresses out; () the whole subnet
    gateways: tuple[str, ...] = ()
    reserved: tuple[str, ...] = ()  # the engine's auxiliary addresses: not for containers
    used: tuple[str, ...] = ()  # the IPv4 addresses its containers have here
    internal: bool = False
    parent: str = ""  # macvlan, ipvlan: the node's interface on the segment

    @property
    def moves_addresses(self) -> bool:
        return self.driver in MOVING_DRIVERS


class Node(Protocol):
    """Facts of the node's engine."""

    def versions(self) -> tuple[str, str, bool]: ...
    def root_dir(self) -> Path: ...
    def ping(self) -> None: ...
    def free_bytes(self) -> int: ...
    def confines_with_seccomp(self) -> bool:
        """Whether the engine gives its containers a seccomp filter by default."""
        ...


class Networks(Protocol):
    """The engine's networks."""

    def network(self, name: str) -> Network | None: ...
    def internal_networks(self, names: list[str]) -> list[str]: ...


class Containers(Protocol):
    """Containers: described, created like a description, started, stopped, removed."""

    def inspect(self, container: str) -> dict[str, Any]:
        """The engine's own view, for what only the engine says (the security options of a
        created container, agent/runtime/criu/images.py); everything else reads `state`."""
        ...
    def state(self, container: str) -> ContainerState: ...
    def describe(self, container: str) -> pb.ContainerSpec: ...
    def list_containers(self) -> list[pb.ContainerSummary]:
        """Every container, with what keeps each from moving; light enough for a listing
        (describe walks volumes and reads memory: one container's full description)."""
        ...
    def create_like(self, spec: pb.ContainerSpec, allow_privileged: bool = False,
                    runtime: str = "") -> str: ...
    def start(self, container: str) -> None: ...
    def running(self, container: str, settle: float = ...) -> bool: ...
    def port_users(self, created: Iterable[str] = ...) -> dict[tuple[str, str, int], str]: ...
    def wait_running(self, cid: str, on_running: Callable[[], None] = ...,
                     settle: float = ..., timeout: float = ...) -> None: ...
    def remove(self, container: str) -> None: ...
    def gone(self, container: str) -> bool: ...
    def logs(self, container: str) -> Iterator[str]: ...
    def restart_policy(self, container: str) -> dict[str, Any]: ...
    def set_restart_policy(self, container: str, policy: dict[str, Any]) -> None: ...
    def upper_dir(self, container: str) -> Path | None: ...
    def pause(self, container: str) -> None: ...
    def unpause(self, container: str) -> None: ...
    def refuse_connections(self, container: str, refuse: bool) -> None: ...
    def isolate(self, container: str, isolated: bool) -> None: ...
    def freeze(self, container: str) -> None: ...
    def kill(self, container: str) -> None: ...


class Checkpoints(Protocol):
    """CRIU checkpoints of a container, and restores from them."""

    method: str
    """"direct" or "engine": how checkpoints move, as `migctl nodes` and reports say."""

    def method_for(self, container: str) -> str: ...
    def post_copy_problem(self) -> str: ...
    def kept_connections_problem(self) -> str: ...
    def checkpoint(self, container: str, name: str, directory: Path,
                   leave_running: bool, page_server: str = "",
                   lazy_in: Path | None = None, *, before_final: bool = False,
                   keep_connections: bool = False) -> Path: ...
    def start_from_checkpoint(self, cid: str, checkpoint_dir: Path, name: str,
                              lazy_in: Path | None = None,
                              keep_connections: bool = False) -> None: ...


class Images(Protocol):
    """Images and their layers."""

    def image_id(self, ref: str) -> str: ...
    def has_image(self, image_id: str) -> bool: ...
    def missing_layers(self, diff_ids: list[str]) -> list[str]: ...
    def held_layers(self) -> set[str]: ...
    def image_with_layer(self, diff_id: str) -> str: ...
    def save_image(self, image: str, dest: Path) -> None: ...
    def load_image(self, archive: Path) -> None: ...
    def ensure_tag(self, image_id: str, ref: str) -> str: ...


class Volumes(Protocol):
    """Named volumes, as folders of this host."""

    def volume_exists(self, name: str) -> bool: ...
    def volume_path(self, name: str) -> Path: ...
    def ensure_volume(self, spec: pb.VolumeSpec) -> Path: ...
    def remove_volume(self, name: str) -> None: ...
    def volume_users(self, name: str) -> list[ContainerState]: ...


class Runtime(Node, Networks, Containers, Checkpoints, Images, Volumes, Protocol):
    """Everything a node's runtime does, each concern its own protocol above: a caller that
    needs one asks for that one."""


def open_runtime(docker_host: str, engine_tmp: Path, containerd: Path) -> Runtime:
    """The node's engine, with the direct checkpoint path where it runs migctl-runc."""
    from migctl.agent.runtime.direct import WrapperPath, wrapper_runtime
    from migctl.agent.runtime.docker import DockerRuntime

    engine = DockerRuntime(docker_host, engine_tmp=engine_tmp, containerd=containerd)
    try:
        name = wrapper_runtime(engine._call("read engine info", engine.api.info))
    except MigctlError:  # an engine not up yet: the agent runs, checkpoints go the long way
        name = ""
    engine.sweep_checkpoints()
    if name:
        engine.direct = WrapperPath(name)
        engine.direct.sweep_requests(engine)
    return engine
