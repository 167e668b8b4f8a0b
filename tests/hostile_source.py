"""A hostile source agent for the zero-trust tests: it holds a real node certificate (a stolen
or compromised node key) and answers a destination's calls with what an attacker would send.

Run in the lab in place of a node's agent: `python -m tests.hostile_source --node nodeC
--listen ADDR --tls-dir DIR --scenario NAME --image-id ID --diff-id D... --criu-version V`.
Each scenario breaks one rule (see SCENARIOS); everything else looks like a real source.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import xxhash

from migctl.agent.delta import Signature, delta_stream
from migctl.agent.delta.wire import Header, WireWriter
from migctl.agent.security import server_credentials
from migctl.agent.version import PROTOCOL_VERSION, version
from migctl.common.channel import OPTIONS
from migctl.common.tls import TLSFiles
from migctl.proto import migctl_pb2 as pb
from migctl.proto import migctl_pb2_grpc as rpc

OUTSIDE = "/tmp/migctl-hostile-outside"  # a file outside staging that an attack aims at
LEAKS = "/tmp/migctl-hostile-leaks"  # what the destination revealed of a cached basis
BIG = 400 << 20

SCENARIOS = {
    "checkpoint-path": "a checkpoint file named checkpoints/pre/../../../../..{OUTSIDE}",
    "checkpoint-abspath": "a checkpoint file with an absolute path",
    "volume-name": "a volume named ../../../../tmp/x",
    "hostconfig": "a container with privileged mode, a device and a bind mount of /",
    "privileged": "a container with privileged mode and added capabilities only",
    "tags": "an image named victim:latest, which names another image at the destination",
    "hardlink": "a volume snapshot: hard link to an outside file, then a file of that name",
    "oversize": "a volume snapshot announced as 10 KB that streams 50 MB",
    "bigdelta": "a final checkpoint file of 64 KiB whose delta announces 400 MiB",
    "rootfs-xattr": "a root filesystem layer that sets trusted.overlay.redirect on a file",
    "final-path": "a final pass that sends checkpoints/final/../../../..{OUTSIDE}",
    "changes-escape": "a final pass whose volume changes delete ../../../..{OUTSIDE}",
    "final-twice": "a final pass that sends the same checkpoint file twice",
    "changes-escape-folder": "a volume snapshot with a link esc -> /tmp, then volume changes "
                             "that make esc a folder and delete esc/<the outside file>",
    "bomb": "a volume snapshot of 1.6 KB, gzip-compressed, that inflates to 64 MiB of zeros",
    "caps": "a container described with no added capabilities whose final checkpoint's core "
            "image gives its process SYS_ADMIN, NET_ADMIN and SYS_PTRACE, and no seccomp filter",
    "caps-pre": "the images of caps in the pre-copy checkpoint (refused before the freeze)",
    "seccomp": "a checkpoint whose process runs filtered, by a seccomp filter that lets every "
               "syscall through",
    "mounts": "a checkpoint whose mounts leave /proc/sys writable (the container's root would "
              "set the host's kernel parameters)",
    "tmpfs": "a checkpoint whose /dev archive (which CRIU unpacks with tar as root) holds 96 "
             "KB of gzip that unpack to 100 MiB, over a /dev of 64 MiB",
    "cache-basis": "a container described with another container's image (its cache key), to "
                   "get the destination's cached checkpoint of it as a delta basis",
}


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def hardlink_tar() -> bytes:
    link = tarfile.TarInfo("x")
    link.type = tarfile.LNKTYPE
    link.linkname = "../../../../../../../.." + OUTSIDE
    data = b"pwned by a hostile source\n"
    file = tarfile.TarInfo("x")
    file.size = len(data)
    return _tar([(link, b""), (file, data)])


def layer_tar(hostile: bool) -> bytes:
    """A root filesystem layer; the hostile one steers overlay through a trusted.* attribute."""
    data = b"hello\n"
    info = tarfile.TarInfo("etc/motd")
    info.size = len(data)
    if hostile:
        info.pax_headers = {"MIGCTL.xattr.trusted.overlay.redirect": b"/".hex()}
    return _tar([(info, data)])


def deleting_tar() -> bytes:
    """A changes archive that deletes a file outside the volume."""
    gone = tarfile.TarInfo("../../../../../../../.." + OUTSIDE)
    gone.pax_headers = {"MIGCTL.deleted": "1"}
    return _tar([(gone, b"")])


def bomb_tar() -> bytes:
    """A gzip-compressed archive: tarfile.open alone would inflate it past every limit."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    return buf.getvalue()


def link_tar() -> bytes:
    """A snapshot whose link points out of the volume (links may point anywhere)."""
    link = tarfile.TarInfo("esc")
    link.type = tarfile.SYMTYPE
    link.linkname = os.path.dirname(OUTSIDE)
    return _tar([(link, b"")])


def folder_deleting_tar() -> bytes:
    """Changes: esc is now a folder, and a file below it is gone: applied in the wrong order,
    the deletion goes through the link."""
    folder = tarfile.TarInfo("esc")
    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
    gone = tarfile.TarInfo("esc/" + os.path.basename(OUTSIDE))
    gone.pax_headers = {"MIGCTL.deleted": "1"}
    return _tar([(folder, b""), (gone, b"")])


def checkpoint_images(scenario: str) -> list[tuple[str, bytes]]:
    """The CRIU images of one task (pid 1) a scenario sends: each breaks one rule of what a
    checkpoint may give its process (tests/criu_kit.py writes them as CRIU does)."""
    from migctl.agent.runtime.criu.images import CAPABILITIES, ENGINE_DEFAULT
    from tests import criu_kit as kit

    caps, chain, mounts = ENGINE_DEFAULT, [(kit.deny(), 1)], kit.container_mounts()
    if scenario == "caps":  # every capability, no seccomp filter
        caps, chain = frozenset(CAPABILITIES), []
    elif scenario == "seccomp":  # a filter, which lets everything through
        chain = [(kit.allow_all(), 1)]
    elif scenario == "mounts":  # /proc/sys left writable
        mounts = kit.container_mounts(readonly=tuple(p for p in kit.READONLY
                                                     if p != "/proc/sys"))
    extra = []
    if scenario == "tmpfs":  # CRIU's tar would fill /dev (and the host's memory, at any size)
        for m in mounts:
            if m.mountpoint == "/dev":
                m.options = "size=65536k,mode=755"
        extra = [(f"tmpfs-dev-{kit.DEV_DEV}.tar.gz.img", _tar_gz("zero", 100 << 20))]
    core = kit.core_entry(caps, mode=2 if chain else None, comm="sleep")
    return [("core-1.img", kit.core_image(core)), ("pstree.img", kit.pstree_image({1: [1]})),
            ("ids-1.img", kit.ids_image()),
            ("seccomp.img", kit.seccomp_image(*chain)),
            ("mountpoints-12.img", kit.mounts_image(*mounts))] + extra


def _tar_gz(name: str, size: int) -> bytes:
    """A gzip tar archive of one file of SIZE zeros, made without holding it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=9) as t:
        info = tarfile.TarInfo(name)
        info.size = size
        t.addfile(info, io.BufferedReader(_Zeros(size)))  # type: ignore[arg-type]
    return out.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def plain_tar() -> bytes:
    data = b"0\n1\n"
    info = tarfile.TarInfo("counter")
    info.size = len(data)
    return _tar([(info, data)])


class Hostile(rpc.AgentServicer):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scenario = args.scenario
        self.pages = os.urandom(64 << 10)
        self.files: dict[str, bytes] = {}
        self.offers: dict[str, Signature] = {}
        self.volumes: list[str] = []

    def _info(self, path: str, data: bytes, size: int | None = None) -> pb.FileInfo:
        self.files[path] = data
        return pb.FileInfo(path=path, size=len(data) if size is None else size,
                           digest=xxhash.xxh3_128(data).hexdigest())

    def GetNode(self, request: Any, context: Any) -> pb.NodeInfo:
        return pb.NodeInfo(node=self.args.node, engine_version="20.10.24",
                           version=version(), protocol_version=PROTOCOL_VERSION,
                           criu_version=self.args.criu_version, checkpoints_enabled=True,
                           staging_free_bytes=1 << 40, engine_free_bytes=1 << 40,
                           memory_available_bytes=1 << 34, load=0.0)

    def Probe(self, request: Any, context: Any) -> Iterator[pb.Chunk]:
        yield pb.Chunk(data=bytes(min(request.size, 1 << 20)))

    def Authorize(self, request: Any, context: Any) -> pb.AuthorizeReply:
        return pb.AuthorizeReply(migration_id=os.urandom(8).hex(), container_id="c" * 64,
                                 expires_in=120)

    def Begin(self, request: Any, context: Any) -> pb.ContainerSpec:
        host: dict[str, Any] = {"RestartPolicy": {"Name": "no"}, "NetworkMode": "bridge"}
        spec = pb.ContainerSpec(id="c" * 64, name=request.container, image="toytsm:1",
                                image_id=self.args.image_id, diff_ids=self.args.diff_id,
                                command=["sleep", "1000"], running=True, memory_bytes=1 << 20,
                                networks=["bridge"])
        if self.scenario == "volume-name":
            spec.volumes.add(name="../../../../tmp/x", destination="/data")
        if self.scenario in ("hardlink", "oversize", "changes-escape", "changes-escape-folder",
                             "bomb"):
            self.volumes.append("hostilevol")
            spec.volumes.add(name="hostilevol", destination="/data", driver="local",
                             volume_id="hostile-guid")
        if self.scenario == "hostconfig":
            host.update(Privileged=True, Binds=["/:/host"],
                        Devices=[{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda",
                                  "CgroupPermissions": "rwm"}])
        if self.scenario == "privileged":
            host.update(Privileged=True, CapAdd=["SYS_ADMIN"])
        if self.scenario == "tags":
            spec.image = "victim:latest"
        spec.engine_config_json = json.dumps({"Config": {"Image": spec.image,
                                                         "Cmd": list(spec.command)},
                                              "HostConfig": host})
        return spec

    def MissingLayers(self, request: Any, context: Any) -> pb.MissingLayersReply:
        return pb.MissingLayersReply()

    def Holdings(self, request: Any, context: Any) -> pb.HoldingsReply:
        return pb.HoldingsReply()

    def ImageConfig(self, request: Any, context: Any) -> pb.ImageConfigReply:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such image here")

    def SnapshotVolume(self, request: Any, context: Any) -> pb.FileInfo:
        path = f"volumes/{request.volume}.tar"
        if self.scenario == "hardlink":
            return self._info(path, hardlink_tar())
        if self.scenario == "changes-escape-folder":
            return self._info(path, link_tar())
        if self.scenario == "bomb":
            return self._info(path, bomb_tar())
        if self.scenario == "oversize":
            self._info(path, os.urandom(50 << 20))
            return pb.FileInfo(path=path, size=10_000, digest="0" * 32)
        return self._info(path, plain_tar())

    def SnapshotRootfs(self, request: Any, context: Any) -> pb.FileInfo:
        return self._info("rootfs.tar", layer_tar(self.scenario == "rootfs-xattr"))

    def Checkpoint(self, request: Any, context: Any) -> pb.CheckpointReply:
        name = request.name
        if self.scenario == "checkpoint-path":
            return pb.CheckpointReply(files=[self._info(
                f"checkpoints/{name}/../../../../../..{OUTSIDE}", b"pwned\n")])
        if self.scenario == "checkpoint-abspath":
            return pb.CheckpointReply(files=[self._info(OUTSIDE, b"pwned\n")])
        if self.scenario == "tags":
            context.abort(grpc.StatusCode.INTERNAL, "hostile source stops here")
        files = [self._info(f"checkpoints/{name}/pages-1.img", self.pages)]
        # the images are honest before the freeze, but for caps-pre: the final checkpoint's
        # are checked again (a source may switch)
        files += [self._info(f"checkpoints/{name}/{file}", data) for file, data in
                  checkpoint_images("caps" if self.scenario == "caps-pre" else "honest")]
        return pb.CheckpointReply(files=files)

    def FetchFile(self, request: Any, context: Any) -> Iterator[pb.Chunk]:
        data = self.files.get(request.path, b"")
        for i in range(0, len(data), 1 << 20):
            yield pb.Chunk(data=data[i:i + (1 << 20)])

    def Vouch(self, request: Any, context: Any) -> pb.VouchReply:
        """A hostile node's own agent vouches for anything: what it is asked about, and the
        keys it wants (the toy's, which any node learns from Holdings)."""
        return pb.VouchReply(keys=[*request.keys, "svc:toytsm:1:toytsm", "app:toytsm:1"])

    def FetchDelta(self, request_iterator: Any, context: Any) -> Iterator[pb.Chunk]:
        target = next(request_iterator).target.path
        sig = Signature.from_chunks(r.signature for r in request_iterator)
        if sig.basis_length and target.startswith("checkpoints/"):
            # the size and hash of the destination's copy: enough for a delta that copies it
            # whole, which then ends with the very hash the destination expects
            with open(LEAKS, "a") as f:
                f.write(f"{target} {sig.basis_length} {sig.basis_hash.hex()}\n")
        for data in self._delta(sig, self.files.get(target, b"")):
            yield pb.Chunk(data=data)

    def _delta(self, sig: Signature, data: bytes) -> Iterator[bytes]:
        with tempfile.NamedTemporaryFile() as f:  # an honest delta of what it announced
            f.write(data)
            f.flush()
            yield from delta_stream(sig, f.name)

    def OfferBases(self, request_iterator: Any, context: Any) -> pb.OfferReply:
        parts: dict[str, list[bytes]] = {}
        path = ""
        for offer in request_iterator:
            path = offer.path or path
            parts.setdefault(path, []).append(offer.signature)
        self.offers = {p: Signature.from_chunks(iter(c)) for p, c in parts.items()}
        return pb.OfferReply(accepted=len(self.offers))

    def FinalSync(self, request: Any, context: Any) -> Iterator[pb.FinalChunk]:
        pages = "checkpoints/final/pages-1.img"
        items = [(pages, self.pages)]
        if self.scenario == "final-path":
            items = [(f"checkpoints/final/../../../../../..{OUTSIDE}", b"pwned\n")]
        if self.scenario == "final-twice":
            items = [(pages, self.pages), (pages, self.pages)]
        if self.scenario != "final-path":
            items += [(f"checkpoints/final/{file}", data)
                      for file, data in checkpoint_images(self.scenario)]
        for name in self.volumes:
            changes = {"changes-escape": deleting_tar,
                       "changes-escape-folder": folder_deleting_tar}.get(self.scenario)
            items.append((f"volumes/{name}.changes.tar", changes() if changes else _tar([])))
        items.append(("rootfs.changes.tar", _tar([])))
        for path, data in items:
            sig = self.offers.get(path)
            if path == pages and self.scenario == "bigdelta" and sig is not None:
                yield pb.FinalChunk(item=pb.FinalItem(path=path, size=len(data),
                                                      method="delta"))
                # a handful of bytes that claim a 400 MiB result, made of copies of the basis
                writer = WireWriter(Header(sig.block_size, sig.basis_length, sig.basis_hash,
                                           BIG))
                per = sig.basis_length // sig.block_size
                for _ in range(BIG // sig.basis_length):
                    writer.copy(0, per)
                writer.end(BIG, b"\0" * 16)
                for chunk in writer.drain(final=True):
                    yield pb.FinalChunk(data=chunk)
                continue
            yield pb.FinalChunk(item=pb.FinalItem(
                path=path, size=len(data), method="whole",
                digest=xxhash.xxh3_128(data).hexdigest()))
            yield pb.FinalChunk(data=data)

    def Commit(self, request: Any, context: Any) -> pb.CommitReply:
        return pb.CommitReply()

    def Resume(self, request: Any, context: Any) -> pb.ResumeReply:
        return pb.ResumeReply(restored=True, detail="hostile source pretends to resume")

    def Release(self, request: Any, context: Any) -> pb.ReleaseReply:
        return pb.ReleaseReply()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--node", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--tls-dir", type=Path, required=True)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    p.add_argument("--image-id", required=True)
    p.add_argument("--diff-id", action="append", default=[])
    p.add_argument("--criu-version", required=True)
    args = p.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    rpc.add_AgentServicer_to_server(Hostile(args), server)
    server.add_secure_port(args.listen, server_credentials(TLSFiles.from_dir(args.tls_dir,
                                                                             args.node)))
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=None)


if __name__ == "__main__":
    main()
