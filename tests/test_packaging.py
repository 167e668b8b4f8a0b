"""The systemd unit of the agent (agent/packaging/migagent.service) is one systemd accepts and
runs the agent with the config file the node installer writes; the wheel carries what a node
needs."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "agent" / "packaging" / "migagent.service"
MIGAGENT = "@MIGAGENT@"  # the installer writes its own environment's migagent there


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_migagent_with_the_config_file_and_its_own_folders() -> None:
    unit = _unit()
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert "docker.service" in unit["Unit"]["After"].split()
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].split() == [MIGAGENT, "--config", "/etc/migctl/agent.toml"]
    assert service["ExecReload"].split()[-2:] == ["-HUP", "$MAINPID"]
    assert (service["StateDirectory"], service["RuntimeDirectory"]) == ("migctl", "migctl")
    assert service["KillMode"] == "process"  # post-copy's lazy-pages daemon outlives it
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_agent_config_the_installer_writes_names_only_migagent_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key its comments show, uncommented, is one the agent takes (it named two with
    underscores, which the agent refused)."""
    import migctl.agent.server as server
    from migctl.agent.install import AGENT_TOML

    lines = [line.removeprefix("# ") for line in AGENT_TOML.splitlines() if " = " in line]
    assert {line.split(" = ")[0] for line in lines} >= {"node", "listen", "tls-dir"}
    config = tmp_path / "agent.toml"
    config.write_text("\n".join(lines) + "\n")
    read: dict = {}  # what the agent would serve with (it is not started here)
    monkeypatch.setattr(server, "serve", lambda *a, **k: read.update(args=a))
    server.main(["--config", str(config)])
    assert read["args"][0] == "nodeA" and Path("/etc/migctl/tls") in read["args"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at a stand-in
    stand_in = tmp_path / "migagent"  # (the installer does the same with the real one)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "migagent.service"
    unit.write_text(UNIT.read_text().replace(MIGAGENT, str(stand_in)))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True)
    # systemd only warns about a setting it cannot parse, and ignores it: no word is allowed
    assert (res.returncode, res.stderr) == (0, "")


def test_every_command_says_the_same_version() -> None:
    """`--version` works on every command (it was a usage error) and they agree."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    bindir = Path(sys.executable).parent
    want = importlib.metadata.version("migctl")
    for command in ("migctl", "migagent", "migctl-delta"):
        res = subprocess.run([str(bindir / command), "--version"], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == f"{command} {want}", \
            (command, res.returncode, res.stdout, res.stderr)


def test_a_node_installs_only_what_an_agent_needs() -> None:
    """matplotlib, rich, redis and grpcio-tools come as extras (lab, progress, registry, dev);
    the minimum versions of grpc and protobuf are what the generated stubs check at import."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    core = {re.split(r"[<>=\[ ]", d)[0] for d in project["project"]["dependencies"]}
    assert not core & {"matplotlib", "rich", "redis", "grpcio-tools", "pytest"}, core
    extras = project["project"]["optional-dependencies"]
    assert any(d.startswith("redis") for d in extras["registry"])
    assert any(d.startswith("rich") for d in extras["progress"])
    stubs = (Path(__file__).parent.parent / "proto" / "migctl_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", stubs).group(1)
    assert f"grpcio>={made_with}" in project["project"]["dependencies"]


def test_the_agents_lock_pins_what_the_full_lock_pins() -> None:
    """requirements-agent.lock (a node's image) is the same versions as requirements.lock."""
    import re
    from pathlib import Path

    def pins(name: str) -> dict[tuple[str, str], str]:
        text = (Path(__file__).parent.parent / name).read_text()
        return {(m[1].lower(), (m[3] or "").strip()): m[2]
                for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)(?: ;(.*?))? \\$", text, re.M)}

    agent, full = pins("requirements-agent.lock"), pins("requirements.lock")
    assert agent and all(full.get(k) == v for k, v in agent.items()), \
        {k: (v, full.get(k)) for k, v in agent.items() if full.get(k) != v}


def test_the_wheel_carries_the_runc_wrapper_and_the_contract(tmp_path) -> None:
    """A node installed from the wheel finds migctl-runc beside the module that registers it,
    and the systemd unit its installer writes; an integrator finds the .proto (the real-nodes
    issue)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("migctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("migctl/agent/runtime/migctl-runc", "migctl/proto/migctl.proto",
                 "migctl/agent/runtime/criu/images.proto",
                 "migctl/agent/packaging/migagent.service"):  # the node installer writes it
        assert want in names, (want, [n for n in names if "runtime" in n][:20])
    # one namespace: nothing installed as a top-level agent, client or proto
    info = f"{wheel.name.split('-py3')[0]}.dist-info"
    assert {n.split("/")[0] for n in names} == {"migctl", info}
    scripts = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "migctl = migctl.client.cli:main" in scripts
    assert "migagent = migctl.agent.server:main" in scripts
    mode = zipfile.ZipFile(wheel).getinfo("migctl/agent/runtime/migctl-runc").external_attr >> 16
    assert mode & 0o111, "the engine runs the wrapper: it must stay executable"
