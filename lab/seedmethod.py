"""The reference method of the evaluation: the seed's traditional migration, as its page
describes it (../shared/reference/seed-traditional-stateful-migration.md), on the lab.

One-iteration pre-copy with the engine's own checkpoints and rsync, run at the destination:
the image layers it lacks (`docker save` / `load`), an archive of every volume, a checkpoint
taken leaving the container running, all pulled with rsync; then the final checkpoint (the
container stops), rsync of the final checkpoint into the copy of the first (rsync's delta) and
of every writable volume's folder into the destination's volume; then the container is
created with the same configuration and started from the checkpoint. The writable layer is not
migrated, as in the seed. rsync pulls from an rsync daemon in the source's namespace, so every
byte crosses the lab's (shaped) link; with `compress`, rsync's zstd (migctl's agents send
their literals zstd-compressed).

One departure from the seed's `rsync -avz`: `--ignore-times`. rsync's quick check skips a file
whose size and mtime (to the second) match, and the final checkpoint's pages often match the
first's in both: the destination then restored the first checkpoint's memory under the final
one's other images (CRIU refused, or Redis came back with older counters). With it, every file
goes through rsync's delta, as the seed intends.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from migctl.agent.runtime.docker import DockerRuntime
from migctl.common.errors import MigctlError
from migctl.lab.nodes import LAB_DIR, RUN_DIR

RSYNC_PORT = 8730
RSYNC = ("rsync", "-a", "--no-whole-file", "--ignore-times", "--delete", "--stats")
"""Every pull's rsync (see the module's note on --ignore-times)."""
WORK = LAB_DIR / "seedmethod"


@dataclass
class Result:
    phases: dict[str, float] = field(default_factory=dict)
    bytes_received: int = 0
    downtime: float = 0.0
    total: float = 0.0


def _ns(node: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", f"migctl-{node}", *cmd]


class SeedMethod:
    def __init__(self, state: dict, source: str, destination: str,
                 compress: bool = False) -> None:
        self.compress = ["--compress", "--compress-choice=zstd"] if compress else []
        self.nodes = state["nodes"]
        self.source, self.destination = source, destination
        self.src, self.dst = (DockerRuntime(self.nodes[n]["docker_host"],
                                            engine_tmp=LAB_DIR / n / "tmp",
                                            containerd=RUN_DIR / n / "containerd" /
                                            "containerd.sock")
                              for n in (source, destination))
        self.src_ip = self.nodes[source]["address"].split(":")[0]
        self.work = WORK / f"{source}-{destination}"
        self.result = Result()

    def pull(self, remote: str, local: Path) -> None:
        """rsync from the source's daemon (module `root` is the source's /), counting bytes."""
        local.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(_ns(self.destination, *RSYNC, *self.compress,
                                 f"rsync://{self.src_ip}:{RSYNC_PORT}/root{remote}", str(local)),
                             capture_output=True, text=True)
        if out.returncode:
            raise MigctlError(f"rsync of {remote} failed: {out.stderr.strip()}")
        m = re.search(r"Total bytes received: ([\d,]+)", out.stdout)
        self.result.bytes_received += int(m.group(1).replace(",", "")) if m else 0

    def migrate(self, container: str) -> Result:
        shutil.rmtree(self.work, ignore_errors=True)
        (self.work / "src").mkdir(parents=True)
        (self.work / "dst").mkdir(parents=True)
        conf = self.work / "rsyncd.conf"
        conf.write_text("[root]\n  path = /\n  read only = yes\n  uid = root\n  gid = root\n")
        daemon = subprocess.Popen(_ns(self.source, "rsync", "--daemon", "--no-detach",
                                      f"--config={conf}", f"--address={self.src_ip}",
                                      f"--port={RSYNC_PORT}"))
        try:
            self._wait_daemon()
            return self._migrate(container)
        finally:
            daemon.terminate()
            daemon.wait()
            shutil.rmtree(self.work, ignore_errors=True)

    def _wait_daemon(self) -> None:
        """Until the source's rsync daemon lists its module (from the destination)."""
        deadline = time.monotonic() + 10
        while subprocess.run(_ns(self.destination, "rsync", f"rsync://{self.src_ip}:"
                                 f"{RSYNC_PORT}/"), capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise MigctlError(f"the rsync daemon on {self.source} does not answer")
            time.sleep(0.1)

    def _migrate(self, container: str) -> Result:
        r, start = self.result, time.monotonic()
        spec = self.src.describe(container)
        r.phases["request"] = time.monotonic() - start
        pre = time.monotonic()
        src_dir, dst_dir = self.work / "src", self.work / "dst"
        # 2.1 the image, when the destination lacks it
        if not self.dst.has_image(spec.image_id):
            self.src.save_image(spec.image_id, src_dir / "image.tar")
            self.pull(str(src_dir / "image.tar"), dst_dir / "image.tar")
            self.dst.load_image(dst_dir / "image.tar")
        spec.image = self.dst.ensure_tag(spec.image_id, spec.image)
        # 2.2 volumes: archives, extracted into volumes made with the same labels and options
        for vol in spec.volumes:
            archive = src_dir / f"{vol.name}.tar"
            subprocess.run(["tar", "-C", str(self.src.volume_path(vol.name)), "-cf",
                            str(archive), "."], check=True)
            self.pull(str(archive), dst_dir / archive.name)
            target = self.dst.ensure_volume(vol)
            subprocess.run(["tar", "-C", str(target), "-xf", str(dst_dir / archive.name)],
                           check=True)
        # 2.3 a checkpoint leaving the container running, copied whole
        ckpt = self.src.checkpoint(spec.id, "pre", src_dir / "ckpt", leave_running=True)
        self.pull(f"{ckpt}/", dst_dir / "ckpt")
        r.phases["pre_copy"] = time.monotonic() - pre
        # 3. the final checkpoint stops the container; 4. rsync's deltas
        frozen = time.monotonic()
        final = self.src.checkpoint(spec.id, "final", src_dir / "ckpt", leave_running=False)
        r.phases["freeze"] = time.monotonic() - frozen
        sync = time.monotonic()
        self.pull(f"{final}/", dst_dir / "ckpt")
        for vol in spec.volumes:
            if not vol.read_only:
                self.pull(f"{self.src.volume_path(vol.name)}/",
                          self.dst.volume_path(vol.name))
        r.phases["final_sync"] = time.monotonic() - sync
        # 5. create the container and start it from the checkpoint
        restore = time.monotonic()
        cid = self.dst.create_like(spec)
        self.dst.start_from_checkpoint(cid, dst_dir / "ckpt", "seed")
        running: list[float] = []
        self.dst.wait_running(cid, on_running=lambda: running.append(time.monotonic()),
                              settle=0.0)
        r.phases["restore"] = running[0] - restore
        r.downtime = running[0] - frozen
        r.total = running[0] - start
        return r
