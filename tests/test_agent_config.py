"""A node's agent: a config file whose keys are its flags, a certificate renewed without a
restart (SIGHUP), and the seconds until it expires as a metric (the real-nodes issue)."""

from __future__ import annotations

import argparse
import shutil
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from migctl.agent import certs
from migctl.agent.authz import Authorization
from migctl.agent.metrics import Metrics
from migctl.agent.security import ServerIdentity
from migctl.agent.server import config_defaults, main
from migctl.common.tls import TLSFiles, secure_channel
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc


def parser_of_migagent() -> argparse.ArgumentParser:
    """migagent's own parser, caught as main() builds it."""
    built: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):  # noqa: ANN001, ANN202
        built.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = catch  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            main([])
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]
    return built[0]


def test_the_config_file_gives_defaults_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('node = "nodeA"\ntls-dir = "/srv/tls"\ncache-mb = 512\n'
                      'page-server-min-mbit = 400\n')
    p = parser_of_migagent()
    p.set_defaults(**config_defaults(p, config))
    args = p.parse_args(["--cache-mb", "64"])
    assert (args.node, args.tls_dir, args.cache_mb, args.page_server_min_mbit) == (
        "nodeA", Path("/srv/tls"), 64, 400.0)


@pytest.mark.parametrize("text,why", [
    ('nod = "nodeA"\n', "'nod' is not a migagent flag"),
    ('cache-mb = "lots"\n', "cache-mb = 'lots' is not a valid value"),
    ('node = \n', "config file"),
])
def test_a_bad_config_file_names_the_key(tmp_path: Path, text: str, why: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    with pytest.raises(Exception, match=why):
        config_defaults(parser_of_migagent(), config)


def test_a_renewed_certificate_is_served_after_sighup_without_a_restart(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    certs.init(old, ["nodeA"], ["client"])
    certs.init(new, ["nodeA"], ["client"])  # another CA: only a reload can make it served
    served = tmp_path / "served"
    shutil.copytree(certs.node_dir(old, "nodeA"), served)
    identity = ServerIdentity(TLSFiles.from_dir(served, "nodeA"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[Authorization()])

    class Agent(rpc.AgentServicer):
        def GetNode(self, request, context):  # noqa: ANN001, ANN201, N802
            return pb.NodeInfo(node="nodeA")

    rpc.add_AgentServicer_to_server(Agent(), server)
    port = server.add_secure_port("127.0.0.1:0", identity.credentials())
    server.start()

    def ask(trusting: Path) -> bool:
        with secure_channel(f"127.0.0.1:{port}", TLSFiles.from_dir(trusting, "client"),
                            server_name="nodeA") as channel:
            try:
                rpc.AgentStub(channel).GetNode(pb.GetNodeRequest(), timeout=5)
                return True
            except grpc.RpcError:
                return False

    try:
        assert ask(old) and not ask(new)
        for name in ("ca.crt", "nodeA.crt", "nodeA.key"):  # renewed in place
            shutil.copy(certs.node_dir(new, "nodeA") / name, served / name)
        assert ask(old), "served the new files before being asked to"
        identity.reload()  # what SIGHUP does
        assert ask(new) and not ask(old)
    finally:
        server.stop(grace=None)


def test_the_certificates_remaining_life_is_a_metric(tmp_path: Path) -> None:
    certs.init(tmp_path, ["nodeA"], ["client"], days=30)
    metrics = Metrics(CollectorRegistry())
    metrics.watch_certificate(certs.node_dir(tmp_path, "nodeA") / "nodeA.crt")
    left = metrics.registry.get_sample_value("migctl_certificate_expiry_seconds")
    assert 29 * 86400 < left <= 30 * 86400 + 3600, left
