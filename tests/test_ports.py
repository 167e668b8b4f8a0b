"""A host port the container publishes must be free at the destination: checked before the
freeze (its restore would fail after it, a rollback and downtime for nothing)."""

from __future__ import annotations

import socket

from migctl.agent.migration.phases.request import ports_taken
from migctl.agent.runtime.host import host_listeners
from migctl.proto import migctl_pb2 as pb


def spec(*ports: tuple[str, str, str]) -> pb.ContainerSpec:
    s = pb.ContainerSpec(name="web")
    for container_port, host_ip, host_port in ports:
        s.ports.add(container_port=container_port, host_ip=host_ip, host_port=host_port)
    return s


def test_a_port_a_container_publishes_is_named_with_its_user() -> None:
    got = ports_taken(spec(("80/tcp", "", "8080"), ("53/udp", "", "5353"), ("81/tcp", "", "")),
                      {("tcp", "0.0.0.0", 8080): "blocker", ("tcp", "", 5353): "other"}, set())
    assert got == ["8080/tcp (used by blocker)"]  # 5353 is taken for tcp only; "" is any


def test_ports_on_distinct_addresses_do_not_collide() -> None:
    users = {("udp", "127.0.0.53", 53): "resolver"}
    assert ports_taken(spec(("53/udp", "192.0.2.10", "53")), users, set()) == []
    assert ports_taken(spec(("53/udp", "127.0.0.53", "53")), users, set()) == [
        "53/udp (used by resolver)"]
    assert ports_taken(spec(("53/udp", "", "53")), users, set()) == ["53/udp (used by resolver)"]


def test_a_port_a_process_of_the_node_listens_on_is_taken() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        listening = host_listeners()
        assert ("tcp", "127.0.0.1", port) in listening
        assert ports_taken(spec(("80/tcp", "", str(port))), {}, listening) == [
            f"{port}/tcp (used by a process of this node)"]
        assert ports_taken(spec(("80/tcp", "192.0.2.10", str(port))), {}, listening) == []
    assert ports_taken(spec(("80/tcp", "", str(port))), {}, host_listeners()) == []


def test_a_bound_udp_port_is_taken_and_a_client_s_is_not() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("::", 0))
        client.connect(("127.0.0.1", 9))  # connected: a client's lookup, say
        listening = host_listeners()
        assert ("udp", "::", server.getsockname()[1]) in listening
        assert not any(port == client.getsockname()[1] for _, _, port in listening)


def test_a_port_both_a_container_and_a_process_hold_names_the_container() -> None:
    """docker-proxy listens for every published port: the container is the user to name."""
    got = ports_taken(spec(("80", "", "8080")), {("tcp", "", 8080): "web-old"},
                      {("tcp", "0.0.0.0", 8080)})
    assert got == ["8080/tcp (used by web-old)"]  # a bare container port is TCP
