"""The committed stubs must be exactly what grpcio-tools makes from proto/migctl.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = ["migctl_pb2.py", "migctl_pb2_grpc.py", "migctl_pb2.pyi"]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    # as scripts/gen-proto.sh makes them: through the namespace (imports of migctl.proto)
    (tmp_path / "migctl" / "proto").mkdir(parents=True)
    source = (ROOT / "proto" / "migctl.proto").read_bytes()
    (tmp_path / "migctl" / "proto" / "migctl.proto").write_bytes(source)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
         "--grpc_python_out=.", "--pyi_out=.", "migctl/proto/migctl.proto"],
        cwd=tmp_path, check=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "migctl" / "proto" / name).read_text()
        committed = (ROOT / "proto" / name).read_text()
        assert fresh == committed, f"proto/{name} is stale: run scripts/gen-proto.sh"


def test_the_criu_image_reader_is_current(tmp_path: Path) -> None:
    folder = tmp_path / "migctl" / "agent" / "runtime" / "criu"
    folder.mkdir(parents=True)
    (folder / "images.proto").write_bytes(
        (ROOT / "agent" / "runtime" / "criu" / "images.proto").read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--pyi_out=.", "migctl/agent/runtime/criu/images.proto"], cwd=tmp_path,
                   check=True)
    for name in ("images_pb2.py", "images_pb2.pyi"):
        assert (folder / name).read_text() == \
            (ROOT / "agent" / "runtime" / "criu" / name).read_text(), \
            f"agent/runtime/criu/{name} is stale: run scripts/gen-proto.sh"
