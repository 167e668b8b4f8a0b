"""Images as separate layers, so that each can come from a different node.

A `docker save` archive is read for the image's config (byte for byte: its sha256 is the image
id) and for single layer tars (their sha256 is the diff id). The destination assembles a
`docker load` archive from a config and the layers it lacks: `docker load` looks each layer up
by chain id and only opens the files of layers the engine does not hold.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from migctl.common.errors import DeltaError, NotFound

CHUNK = 1 << 20


def _manifest(tar: tarfile.TarFile) -> dict:
    return json.load(tar.extractfile("manifest.json"))[0]  # type: ignore[arg-type]


def config_of(saved: Path) -> tuple[bytes, list[str]]:
    with tarfile.open(saved) as tar:
        m = _manifest(tar)
        return tar.extractfile(m["Config"]).read(), m.get("RepoTags") or []  # type: ignore


def iter_layer(saved: Path, diff_id: str) -> Iterator[bytes]:
    with tarfile.open(saved) as tar:
        m = _manifest(tar)
        config = json.load(tar.extractfile(m["Config"]))  # type: ignore[arg-type]
        for path, d in zip(m["Layers"], config["rootfs"]["diff_ids"], strict=True):
            if d == diff_id:
                f = tar.extractfile(path)
                assert f is not None
                while data := f.read(CHUNK):
                    yield data
                return
    raise NotFound(f"layer {diff_id} is not in the saved image")


def verify_sha256(path: Path, expected: str, what: str) -> None:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(CHUNK):
            h.update(data)
    if "sha256:" + h.hexdigest() != expected:
        path.unlink(missing_ok=True)
        raise DeltaError(f"{what}: content does not match {expected[:19]}; refused")


def assemble(config: bytes, repo_tags: list[str], layers: dict[str, Path], out: Path) -> None:
    """A `docker load` archive holding CONFIG and the layer files given (by diff id)."""
    cfg = json.loads(config)
    image_hex = hashlib.sha256(config).hexdigest()
    diff_ids = cfg["rootfs"]["diff_ids"]
    manifest = [{"Config": f"{image_hex}.json", "RepoTags": repo_tags,
                 "Layers": [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]}]
    with tarfile.open(out, "w") as tar:
        def add_bytes(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))

        add_bytes(f"{image_hex}.json", config)
        for d in diff_ids:
            if d in layers:
                tar.add(layers[d], arcname=f"{d.split(':')[1]}/layer.tar")
        add_bytes("manifest.json", json.dumps(manifest).encode())
