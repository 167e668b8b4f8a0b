"""Install the migctl agent on a real node, beside the Docker that is already there.

Not the lab's setup (scripts/setup.sh installs Debian's docker.io, lab and dev tools): this
reuses the node's Docker engine (Docker CE stays, its containerd untouched) and adds only what
an agent needs, recording each change in RECORD so that `--uninstall` takes back exactly those:

- the runc wrapper (`migctl-runc`, the direct checkpoint path) in /usr/local/lib/migctl;
- in /etc/docker/daemon.json, merged, never overwritten: `"experimental": true` and the
  wrapper as the runtime `migctl` (`--default-runtime` also makes it the engine's default);
  a value the operator set otherwise is refused, naming it, unless `--force`;
- /etc/migctl/criu-tcp-close.conf and the engine's drop-in
  /etc/systemd/system/docker.service.d/migctl.conf naming it (and the probed CRIU first on
  PATH): containers the engine runs with plain runc close their connections, as before;
- /etc/sysctl.d/60-migctl.conf: fs.pipe-max-size for CRIU's lazy pages (post-copy), kept
  across reboots;
- in /etc/criu/runc.conf, added to what is there: tcp-established, skip-in-flight, file-locks
  (never tcp-close: the wrapper gives it per call; one the operator put there is left, and
  named, as it closes every container's connections);
- the systemd unit (/etc/systemd/system/migagent.service) and /etc/migctl/agent.toml (each
  key the agent's flag of the same name), the latter only when absent.

It neither restarts Docker nor starts the agent: it says what to run. `--dry-run` prints what
it would change; a second run changes nothing. `--root DIR` works on a tree under DIR (tests).
CRIU is checked, not installed: scripts/criu-probe.sh (or scripts/setup.sh's CRIU step)
decides which CRIU works on a kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from migctl.agent.runtime.direct import DIRECT_RUNTIME, WRAPPER
from migctl.agent.version import VersionAction

RUNC_OPTIONS = ("tcp-established", "skip-in-flight", "file-locks")  # docs/real-machines.md
PIPE_MAX = 4 << 20  # fs.pipe-max-size CRIU's lazy page server needs (docs/runtime.md)
UNIT = Path(__file__).resolve().parent / "packaging" / "migagent.service"
DOCKER_DROPIN = """\
# migctl: the engine's runc finds the probed CRIU, and containers run with plain runc close
# their connections at a checkpoint or a restore (migctl-runc chooses per call)
[Service]
Environment=PATH=/opt/migctl/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
Environment=CRIU_CONFIG_FILE=/etc/migctl/criu-tcp-close.conf
"""
AGENT_TOML = """\
# The migctl agent's configuration: each key is the migagent flag of the same name
# (`migagent --help`); the commented values are the defaults. Set node, then
# `systemctl enable --now migagent`.
# node = "nodeA"
# listen = "0.0.0.0:50051"
# tls-dir = "/etc/migctl/tls"
# inventory = "/etc/migctl/inventory.json"
# state-dir = "/var/lib/migctl/agent"
# registry = "redis://10.0.0.5:6379/0"
"""


class Installer:
    def __init__(self, root: Path, dry_run: bool, force: bool, default_runtime: bool) -> None:
        self.root, self.dry_run, self.force = root, dry_run, force
        self.default_runtime = default_runtime
        self.record_path = self.at("/var/lib/migctl/install.json")
        self.record: dict = json.loads(self.record_path.read_text()) \
            if self.record_path.exists() else {"files": [], "daemon_json": {}}
        self.record.setdefault("runc_conf", [])
        self.changed: list[str] = []

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def say(self, what: str) -> None:
        self.changed.append(what)
        print(("would: " if self.dry_run else "") + what)

    def file(self, path: str, data: bytes, mode: int, keep: bool = False) -> None:
        """PATH holds DATA (KEEP: an existing file is the operator's, left as it is)."""
        target = self.at(path)
        if target.exists() and (keep or target.read_bytes() == data):
            return
        self.say(f"write {path}")
        if not self.dry_run:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(mode)
            if path not in self.record["files"]:
                self.record["files"].append(path)

    def daemon_json(self, wrapper: str) -> None:
        path = self.at("/etc/docker/daemon.json")
        current = json.loads(path.read_text() or "{}") if path.exists() else {}
        wanted = {"experimental": True, "runtimes": {DIRECT_RUNTIME: {"path": wrapper}}}
        if self.default_runtime:
            wanted["default-runtime"] = DIRECT_RUNTIME
        merged, added = dict(current), {}
        for key, value in wanted.items():
            if key == "runtimes":
                runtimes = dict(current.get("runtimes") or {})
                if runtimes.get(DIRECT_RUNTIME) not in (None, value[DIRECT_RUNTIME]) \
                        and not self.force:
                    raise SystemExit(f"install: daemon.json's runtime {DIRECT_RUNTIME!r} is "
                                     f"{runtimes[DIRECT_RUNTIME]}: not ours (--force replaces)")
                if runtimes.get(DIRECT_RUNTIME) != value[DIRECT_RUNTIME]:
                    added["runtimes"] = runtimes.get(DIRECT_RUNTIME, "absent")
                    runtimes[DIRECT_RUNTIME] = value[DIRECT_RUNTIME]
                merged["runtimes"] = runtimes
            elif current.get(key) != value:
                if key in current and not self.force:
                    raise SystemExit(f"install: daemon.json sets {key} to {current[key]!r}; "
                                     f"migctl needs {value!r} (--force replaces it)")
                merged[key] = value
                added[key] = current.get(key, "absent")
        if not added:
            return
        self.say(f"merge into /etc/docker/daemon.json: {', '.join(sorted(added))} (restart "
                 "Docker for it to apply)")
        if not self.dry_run:
            for key, before in added.items():
                self.record["daemon_json"].setdefault(key, before)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(merged, indent=2) + "\n")

    def runc_conf(self) -> None:
        """runc's CRIU options, added line by line to the operator's file."""
        path = self.at("/etc/criu/runc.conf")
        lines = path.read_text().splitlines() if path.exists() else []
        have = {line.strip() for line in lines}
        if "tcp-close" in have:
            print("note: /etc/criu/runc.conf has tcp-close, which closes every container's "
                  "connections at every restore: remove it for migrations to keep them")
        missing = [o for o in RUNC_OPTIONS if o not in have]
        if not missing:
            return
        self.say(f"add {', '.join(missing)} to /etc/criu/runc.conf")
        if not self.dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{line}\n" for line in [*lines, *missing]))
            self.record["runc_conf"] += missing

    def install(self) -> None:
        if not (self.at("/usr/bin/dockerd").exists() or self.at("/usr/sbin/dockerd").exists()
                or self.at("/var/run/docker.sock").exists()):
            raise SystemExit("install: no Docker engine on this node (dockerd, or its socket): "
                             "install Docker first; migctl reuses the one there")
        wrapper = "/usr/local/lib/migctl/migctl-runc"
        self.file(wrapper, WRAPPER.read_bytes(), 0o755)
        self.daemon_json(wrapper)
        self.runc_conf()
        # plain runc's calls close connections, as before; migctl-runc chooses per call
        self.file("/etc/migctl/criu-tcp-close.conf", b"tcp-close\n", 0o644)
        self.file("/etc/systemd/system/docker.service.d/migctl.conf", DOCKER_DROPIN.encode(),
                  0o644)
        self.file("/etc/sysctl.d/60-migctl.conf",
                  f"# CRIU's lazy page server (post-copy), migctl\nfs.pipe-max-size = "
                  f"{PIPE_MAX}\n".encode(), 0o644)
        if not UNIT.is_file():
            raise SystemExit(f"install: {UNIT} is missing: a damaged installation")
        # the agent of the environment this installer runs from (a venv's, or the system's)
        migagent = Path(sys.executable).parent / "migagent"
        self.file("/etc/systemd/system/migagent.service",
                  UNIT.read_text().replace("@MIGAGENT@", str(migagent)).encode(), 0o644)
        self.file("/etc/migctl/agent.toml", AGENT_TOML.encode(), 0o644, keep=True)
        self.save()
        if not self.changed:
            print("install: nothing to change; migctl's files are in place")
        elif not self.dry_run:
            print("then: sysctl --system; systemctl daemon-reload; systemctl restart docker "
                  "(for daemon.json and its drop-in); set node in /etc/migctl/agent.toml; "
                  "systemctl enable --now migagent")

    def uninstall(self) -> None:
        for path in reversed(self.record["files"]):
            if self.at(path).exists():
                self.say(f"remove {path}")
                if not self.dry_run:
                    self.at(path).unlink()
        conf = self.at("/etc/criu/runc.conf")
        if self.record["runc_conf"] and conf.exists():
            ours = set(self.record["runc_conf"])
            self.say(f"take {', '.join(sorted(ours))} back out of /etc/criu/runc.conf")
            if not self.dry_run:
                kept = [line for line in conf.read_text().splitlines()
                        if line.strip() not in ours]
                if kept:
                    conf.write_text("".join(f"{line}\n" for line in kept))
                else:
                    conf.unlink()
        path = self.at("/etc/docker/daemon.json")
        if self.record["daemon_json"] and path.exists():
            current = json.loads(path.read_text() or "{}")
            for key, before in self.record["daemon_json"].items():
                if key == "runtimes":  # BEFORE: the operator's runtime of that name, if any
                    runtimes = current.setdefault("runtimes", {})
                    if before == "absent":
                        runtimes.pop(DIRECT_RUNTIME, None)
                    else:
                        runtimes[DIRECT_RUNTIME] = before
                    if not runtimes:
                        current.pop("runtimes")
                elif before == "absent":
                    current.pop(key, None)
                else:
                    current[key] = before
            self.say("take migctl's keys back out of /etc/docker/daemon.json")
            if not self.dry_run:
                path.write_text(json.dumps(current, indent=2) + "\n")
        if not self.dry_run:
            self.record = {"files": [], "daemon_json": {}, "runc_conf": []}
            self.record_path.unlink(missing_ok=True)

    def save(self) -> None:
        if not self.dry_run and self.changed:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self.record_path.write_text(json.dumps(self.record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="migctl-install-node", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print what would change, change "
                   "nothing")
    p.add_argument("--uninstall", action="store_true", help="take back what install added")
    p.add_argument("--force", action="store_true", help="replace daemon.json values the "
                   "operator set otherwise")
    p.add_argument("--default-runtime", action="store_true", help="make migctl-runc the "
                   "engine's default runtime (the direct checkpoint path for every container)")
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    p.add_argument("--version", action=VersionAction)
    args = p.parse_args(argv)
    installer = Installer(args.root, args.dry_run, args.force, args.default_runtime)
    if args.uninstall:
        installer.uninstall()
    else:
        installer.install()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
