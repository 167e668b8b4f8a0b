"""Against a real lab agent: who may call it, and what it will serve."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from migctl.agent import certs
from migctl.common.channel import OPTIONS, open_channel
from migctl.common.tls import TLSFiles
from migctl.lab.nodes import Lab
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc
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

    # certificates of our CA made before roles existed (no OU) are valid TLS, but no role
    old = tmp_path / "old"
    old.mkdir()
    ca_key = certs._load_ca_key(Lab().tls_dir / "private" / "ca.key")
    ca_cert = x509.load_pem_x509_certificate((Lab().tls_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = certs._make_leaf("client", None, ["client"], certs._CLIENT_EKU, key, ca_cert,
                            ca_key, 1)
    (old / "ca.crt").write_bytes((Lab().tls_dir / "ca.crt").read_bytes())
    (old / "client.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (old / "client.key").write_bytes(certs._key_pem(key))
    with open_channel(address, TLSFiles.from_dir(old, "client")) as ch:
        with pytest.raises(grpc.RpcError) as err:
            rpc.AgentStub(ch).GetNode(pb.GetNodeRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no migctl role" in err.value.details()


def test_file_serving_stays_in_the_staging_area(lab: LabHandle) -> None:
    """Even the bound destination of an authorized migration reads nothing but its staging."""
    from migctl.lab.workloads import ensure_toy_image, remove_everywhere, run_toy
    from tests.conftest import CACHE

    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
    ensure_toy_image(lab.docker["nodeA"], CACHE)
    run_toy(lab.docker["nodeA"])
    tls = Lab().tls_dir
    with open_channel(lab.address("nodeA"), TLSFiles.from_dir(tls, "client")) as ch:
        grant = rpc.AgentStub(ch).Authorize(pb.AuthorizeRequest(
            container="toytsm", destination_node="nodeC"), timeout=30)
    mid = grant.migration_id
    with open_channel(lab.address("nodeA"),
                      TLSFiles.from_dir(certs.node_dir(tls, "nodeC"), "nodeC")) as ch:
        agent = rpc.AgentStub(ch)
        agent.Begin(pb.BeginRequest(migration_id=mid, container="toytsm"), timeout=30)
        for path in ["../../../../etc/passwd", "/etc/passwd", ""]:
            with pytest.raises(grpc.RpcError) as err:
                list(agent.FetchFile(pb.FileRef(migration_id=mid, path=path), timeout=5))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        with pytest.raises(grpc.RpcError) as err:
            list(agent.FetchFile(pb.FileRef(migration_id="../..", path="etc/passwd"),
                                 timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for volume in ("../../etc", "testro-not-mine"):
            with pytest.raises(grpc.RpcError) as err:
                agent.SnapshotVolume(pb.SnapshotVolumeRequest(migration_id=mid, volume=volume),
                                     timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, volume
            assert "is not a volume of migration" in err.value.details()
        agent.Release(pb.ReleaseRequest(migration_id=mid, container="toytsm"), timeout=30)
    staging = Lab().node_dir("nodeA") / "agent" / "staging"
    assert not (staging / mid).exists(), "a released migration keeps no staging"
    remove_everywhere(lab.docker, ["toytsm"], ["testrw", "testro"])
