"""The node installer on a stock node's tree (under a scratch root): it reuses the Docker there,
merges daemon.json without losing the operator's keys, refuses to override them, changes
nothing the second time or with --dry-run, and --uninstall takes back exactly what it added."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migctl.agent.install import main

OPERATORS = {"log-driver": "journald", "runtimes": {"nvidia": {"path": "/usr/bin/nvidia"}},
             "data-root": "/srv/docker"}


def stock_node(root: Path, daemon: dict | None = None) -> Path:
    """A node with Docker CE: its dockerd, its daemon.json (the operator's keys)."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/dockerd").write_text("#!/bin/sh\n")
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text(json.dumps(daemon or OPERATORS))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def run(root: Path, *args: str) -> None:
    main(["--root", str(root), *args])


def test_install_merges_and_uninstall_takes_back_exactly_what_it_added(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = stock_node(tmp_path)
    before = tree(root)
    run(root, "--dry-run")
    assert tree(root) == before, "--dry-run changed something"
    assert "would: merge into /etc/docker/daemon.json" in capsys.readouterr().out
    run(root)
    daemon = json.loads((root / "etc/docker/daemon.json").read_text())
    assert daemon["experimental"] is True
    assert daemon["runtimes"]["migctl"]["path"] == "/usr/local/lib/migctl/migctl-runc"
    assert {k: daemon[k] for k in ("log-driver", "data-root")} == \
        {"log-driver": "journald", "data-root": "/srv/docker"}
    assert daemon["runtimes"]["nvidia"] == OPERATORS["runtimes"]["nvidia"]
    assert "default-runtime" not in daemon  # only with --default-runtime
    wrapper = root / "usr/local/lib/migctl/migctl-runc"
    assert wrapper.stat().st_mode & 0o777 == 0o755
    assert "fs.pipe-max-size = 4194304" in (root / "etc/sysctl.d/60-migctl.conf").read_text()
    assert (root / "etc/systemd/system/migagent.service").read_text().startswith("# The migctl")
    assert (root / "etc/migctl/agent.toml").exists()
    assert (root / "etc/criu/runc.conf").read_text().split() == [
        "tcp-established", "skip-in-flight", "file-locks"]  # never tcp-close
    # ...which plain runc's calls get from the engine's environment instead
    dropin = (root / "etc/systemd/system/docker.service.d/migctl.conf").read_text()
    assert "Environment=CRIU_CONFIG_FILE=/etc/migctl/criu-tcp-close.conf" in dropin
    assert (root / "etc/migctl/criu-tcp-close.conf").read_text() == "tcp-close\n"
    capsys.readouterr()
    installed = tree(root)
    run(root)
    assert tree(root) == installed, "a second run changed something"
    assert "nothing to change" in capsys.readouterr().out
    run(root, "--uninstall")
    after = tree(root)
    assert json.loads(after.pop("etc/docker/daemon.json")) == OPERATORS
    before.pop("etc/docker/daemon.json")
    assert after == before, "uninstall left or took something else"


def test_the_operators_values_are_refused_by_name_unless_forced(tmp_path: Path) -> None:
    root = stock_node(tmp_path, {"experimental": False,
                                 "runtimes": {"migctl": {"path": "/opt/other"}}})
    with pytest.raises(SystemExit, match="daemon.json sets experimental to False"):
        run(root)
    assert json.loads((root / "etc/docker/daemon.json").read_text())["experimental"] is False
    run(root, "--force", "--default-runtime")
    daemon = json.loads((root / "etc/docker/daemon.json").read_text())
    assert daemon["experimental"] is True and daemon["default-runtime"] == "migctl"
    run(root, "--uninstall")
    daemon = json.loads((root / "etc/docker/daemon.json").read_text())
    assert daemon == {"experimental": False, "runtimes": {"migctl": {"path": "/opt/other"}}}


def test_an_agent_config_the_operator_wrote_is_kept(tmp_path: Path) -> None:
    root = stock_node(tmp_path)
    (root / "etc/migctl").mkdir(parents=True)
    (root / "etc/migctl/agent.toml").write_text('node = "nodeA"\n')
    run(root)
    run(root, "--uninstall")
    assert (root / "etc/migctl/agent.toml").read_text() == 'node = "nodeA"\n'


def test_a_node_without_docker_is_told_so(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no Docker engine on this node"):
        run(tmp_path)
    assert tree(tmp_path) == {}


def test_the_operators_runc_conf_is_added_to_and_given_back_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = stock_node(tmp_path)
    conf = root / "etc/criu/runc.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("tcp-established\ntcp-close\nlog-file /var/log/criu.log\n")
    run(root)
    assert conf.read_text().splitlines() == ["tcp-established", "tcp-close",
                                             "log-file /var/log/criu.log", "skip-in-flight",
                                             "file-locks"]
    assert "runc.conf has tcp-close, which closes every container's connections" in \
        capsys.readouterr().out  # the operator's: named, not removed
    run(root, "--uninstall")
    assert conf.read_text() == "tcp-established\ntcp-close\nlog-file /var/log/criu.log\n"
