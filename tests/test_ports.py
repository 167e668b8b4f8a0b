"""A host port the container publishes must be free at the destination: checked before the
freeze (its restore would fail after it, a rollback and downtime for nothing)."""

from __future__ import annotations

import socket

from agent.migration.flow import ports_taken
from agent.runtime.docker import host_listeners
from proto import migctl_pb2 as pb


def spec(*ports: tuple[str, str]) -> pb.ContainerSpec:
    s = pb.ContainerSpec(name="web")
    for container_port, host_port in ports:
        s.ports.add(container_port=container_port, host_port=host_port)
    return s


def test_a_port_a_running_container_publishes_is_named_with_its_user() -> None:
    got = ports_taken(spec(("80/tcp", "8080"), ("53/udp", "5353"), ("81/tcp", "")),
                      {("tcp", 8080): "blocker", ("tcp", 5353): "other"}, set())
    assert got == ["8080/tcp (used by blocker)"]  # 5353 is taken for tcp only; "" is any


def test_a_port_a_process_of_the_node_listens_on_is_taken() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        listening = host_listeners()
        assert ("tcp", port) in listening
        assert ports_taken(spec(("80/tcp", str(port))), {}, listening) == [
            f"{port}/tcp (used by a process of this node)"]
    assert ports_taken(spec(("80/tcp", str(port))), {}, host_listeners()) == []
