"""The Agent service: thin gRPC handlers over the runtime, the data plane and the flow."""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import grpc

from agent.catalog.store import Store
from agent.dataplane import archive
from agent.dataplane.files import digest, iter_file
from agent.dataplane.staging import Staging
from agent.delta import Signature, delta_stream
from agent.errors import InvalidArgument, MigctlError
from agent.migration.flow import Migration
from agent.runtime.docker import DockerRuntime
from proto import migctl_pb2 as pb
from proto import migctl_pb2_grpc as rpc

log = logging.getLogger(__name__)


def handler(fn: Any) -> Any:
    """Map our errors onto gRPC statuses so a peer sees the operator's message, not a trace."""

    @wraps(fn)
    def wrapped(self: AgentService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = fn(self, request, context)
            if hasattr(result, "__next__"):
                return _stream_guard(result, context)
            return result
        except MigctlError as err:
            context.abort(err.code, str(err))
        except Exception as err:  # noqa: BLE001 - the caller gets the reason, the log the trace
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {err}")

    return wrapped


def _stream_guard(gen: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    try:
        yield from gen
    except MigctlError as err:
        context.abort(err.code, str(err))
    except Exception as err:  # noqa: BLE001
        log.exception("stream failed")
        context.abort(grpc.StatusCode.INTERNAL, str(err))


class AgentService(rpc.AgentServicer):
    def __init__(self, node: str, runtime: DockerRuntime, state_dir: Path) -> None:
        self.node = node
        self.runtime = runtime
        self.state_dir = state_dir
        self.staging = Staging(state_dir)
        self.store = Store(state_dir)
        self._migrating: set[str] = set()
        self._lock = threading.Lock()

    @handler
    def GetNode(self, request: pb.GetNodeRequest, context: Any) -> pb.NodeInfo:
        engine, criu = self.runtime.versions()
        return pb.NodeInfo(node=self.node, engine_version=engine, criu_version=criu,
                           docker_root_dir=str(self.runtime.root_dir()))

    @handler
    def DescribeContainer(self, request: pb.ContainerRef, context: Any) -> pb.ContainerSpec:
        bound = self.runtime.unsupported_mounts(request.container)
        if bound:
            raise InvalidArgument(
                f"container {request.container!r} has bind mounts ({'; '.join(bound)}): host "
                "paths do not exist on another node; use named volumes")
        return self.runtime.describe(request.container)

    @handler
    def MissingLayers(self, request: pb.MissingLayersRequest, context: Any) -> Any:
        return pb.MissingLayersReply(missing=self.runtime.missing_layers(list(request.diff_ids)))

    @handler
    def ExportImage(self, request: pb.ExportImageRequest, context: Any) -> Iterator[pb.Chunk]:
        work = Path(tempfile.mkdtemp(prefix="export-", dir=self.state_dir))
        try:
            path = self.runtime.export_image(request.image, set(request.skip_diff_ids), work)
            for data in iter_file(path):
                yield pb.Chunk(data=data)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @handler
    def SnapshotVolume(self, request: pb.SnapshotVolumeRequest, context: Any) -> pb.FileInfo:
        path = self.staging.resolve(request.migration_id, request.name)
        archive.snapshot(self.runtime.volume_path(request.volume), path)
        return pb.FileInfo(path=request.name, size=path.stat().st_size, digest=digest(path))

    @handler
    def Checkpoint(self, request: pb.CheckpointRequest, context: Any) -> pb.CheckpointReply:
        import time

        start = time.monotonic()
        area = self.staging.area(request.migration_id)
        folder = self.runtime.checkpoint(request.container, request.name, area / "checkpoints",
                                         request.leave_running)
        seconds = time.monotonic() - start
        files = [pb.FileInfo(path=str(p.relative_to(area)), size=p.stat().st_size,
                             digest=digest(p))
                 for p in sorted(folder.rglob("*")) if p.is_file()]
        return pb.CheckpointReply(files=files, seconds=seconds)

    @handler
    def FetchFile(self, request: pb.FileRef, context: Any) -> Iterator[pb.Chunk]:
        path = self.staging.resolve(request.migration_id, request.path)
        for data in iter_file(path):
            yield pb.Chunk(data=data)

    @handler
    def FetchDelta(self, request_iterator: Iterator[pb.DeltaRequest], context: Any) -> Any:
        first = next(request_iterator, None)
        if first is None or not first.HasField("target"):
            raise InvalidArgument("FetchDelta: the first message must name the target file")
        path = self.staging.resolve(first.target.migration_id, first.target.path)
        signature = Signature.from_chunks(r.signature for r in request_iterator)
        for data in delta_stream(signature, path):
            yield pb.Chunk(data=data)

    @handler
    def Resume(self, request: pb.ResumeRequest, context: Any) -> pb.ResumeReply:
        folder = self.staging.resolve(request.migration_id, f"checkpoints/{request.checkpoint}")
        cid = self.runtime.inspect(request.container)["Id"]
        if self.runtime.inspect(cid)["State"].get("Running"):
            return pb.ResumeReply(restored=True, detail="it was still running")
        try:
            self.runtime.start_from_checkpoint(cid, folder, f"resume-{request.migration_id}")
            self.runtime.wait_running(cid)
            return pb.ResumeReply(restored=True, detail="restored from its final checkpoint")
        except MigctlError as err:
            log.warning("resume from checkpoint failed, restarting fresh: %s", err)
            self.runtime.start(cid)
            self.runtime.wait_running(cid)
            return pb.ResumeReply(restored=False,
                                  detail=f"restore failed ({err}); restarted without its memory")

    @handler
    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseReply:
        if request.completed:
            cid = self.runtime.inspect(request.container)["Id"]
            if request.remove_container:
                self.runtime.remove(cid)
            else:
                self.store.mark_departed(cid, request.migration_id)
        self.staging.drop(request.migration_id)
        return pb.ReleaseReply()

    def Migrate(self, request: pb.MigrateRequest, context: Any) -> Iterator[pb.MigrationEvent]:
        """Runs the migration in its own thread: a client that goes away must not be able to
        stop it halfway (after the freeze only completion or rollback are safe)."""
        if not request.container or not request.source_address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Migrate needs a container and the source agent's address")
        with self._lock:
            if request.container in self._migrating:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"{request.container!r} is already being migrated to {self.node}")
            self._migrating.add(request.container)
        events: queue.Queue[pb.MigrationEvent | MigctlError | None] = queue.Queue()

        def work() -> None:
            try:
                Migration(node=self.node, runtime=self.runtime,
                          staging_root=self.staging.root, request=request, emit=events.put,
                          is_migrated_away=self.store.is_departed).run()
                events.put(None)
            except MigctlError as err:
                events.put(err)
            except Exception as err:  # noqa: BLE001
                log.exception("migration failed")
                events.put(MigctlError(f"internal error: {err}"))
            finally:
                with self._lock:
                    self._migrating.discard(request.container)

        threading.Thread(target=work, name=f"migrate-{request.container}", daemon=True).start()
        while (item := events.get()) is not None:
            if isinstance(item, MigctlError):
                context.abort(item.code, str(item))
            if context.is_active():
                yield item

