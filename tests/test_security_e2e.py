"""Against a real lab agent: who may call it, and what it will serve."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from agent import certs
from agent.dataplane.channel import OPTIONS, open_channel
from agent.security import TLSFiles
from client.lab import Lab
from proto import migctl_pb2 as pb
from proto import migctl_pb2_grpc as rpc
from tests.conftest import LabHandle

pytestmark = pytest.mark.lab


def test_callers_without_a_valid_certificate_are_refused(lab: LabHandle, tmp_path: Path) -> None:
    address = lab.address("nodeA")
    with grpc.insecure_channel(address, options=OPTIONS) as ch:
        with pytest.raises(grpc.RpcError) as err:
            rpc.AgentStub(ch).GetNode(pb.GetNodeRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    certs.init(tmp_path, ["nodeA"], ["client"])  # a CA of its own, names that look right
    with open_channel(address, TLSFiles.from_dir(tmp_path, "client")) as ch:
        with pytest.raises(grpc.RpcError) as err:
            rpc.AgentStub(ch).GetNode(pb.GetNodeRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    with open_channel(address, TLSFiles.from_dir(Lab().tls_dir, "client")) as ch:
        assert rpc.AgentStub(ch).GetNode(pb.GetNodeRequest(), timeout=5).node == "nodeA"


def test_file_serving_stays_in_the_staging_area(lab: LabHandle) -> None:
    with open_channel(lab.address("nodeA"), TLSFiles.from_dir(Lab().tls_dir, "client")) as ch:
        agent = rpc.AgentStub(ch)
        for mid, path in [("m1", "../../../../etc/passwd"), ("m1", "/etc/passwd"),
                          ("../..", "etc/passwd"), ("m1", "")]:
            with pytest.raises(grpc.RpcError) as err:
                list(agent.FetchFile(pb.FileRef(migration_id=mid, path=path), timeout=5))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (mid, path)
        with pytest.raises(grpc.RpcError) as err:
            agent.SnapshotVolume(pb.SnapshotVolumeRequest(
                migration_id="m1", volume="../../etc", name="x.tar"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid volume name" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            agent.SnapshotVolume(pb.SnapshotVolumeRequest(
                migration_id="m1", volume="testrw", name="../../escape.tar"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for name in ("../x", "a b", "-rf"):
            with pytest.raises(grpc.RpcError) as err:
                agent.Begin(pb.BeginRequest(migration_id="m2", container=name), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    staging = Path(lab.nodes["nodeA"]["docker_host"].removeprefix("unix://")).parent
    assert not list(staging.parent.rglob("escape.tar"))
