"""migctl-runc: every call reaches runc unchanged, except a staged checkpoint or restore."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from migctl.agent.runtime import direct
from migctl.common.errors import RuntimeFailure

CID = "a" * 64


@pytest.fixture
def run(tmp_path: Path):
    """Run the wrapper with a fake runc that prints its arguments as JSON."""
    fake = tmp_path / "runc"
    fake.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                    "print(json.dumps(sys.argv[1:]))\n"
                    f"open({str(tmp_path / 'criu-config')!r}, 'w').write("
                    "os.environ.get('CRIU_CONFIG_FILE', ''))\n")
    fake.chmod(0o755)
    requests = tmp_path / "requests"
    requests.mkdir()

    # nsenter stands in too: it prints where it would have run the rest
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nsenter").write_text('#!/bin/sh\nns=$1; shift\nexec "$@" "(in $ns)"\n')
    (bin_dir / "nsenter").chmod(0o755)

    def call(*args: str, **extra: str) -> list[str]:
        env = dict(os.environ, MIGCTL_RUNC=str(fake), MIGCTL_RUNC_DIR=str(requests),
                   PATH=f"{bin_dir}:{os.environ['PATH']}", **extra)
        out = subprocess.run([str(direct.WRAPPER), *args], env=env, capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout)

    call.requests = requests  # type: ignore[attr-defined]
    call.criu_config = lambda: (tmp_path / "criu-config").read_text()  # type: ignore[attr-defined]
    return call


ORDINARY = [
    ["--version"],
    ["--root", "/run/x", "--log", "/l/log.json", "--log-format", "json", "state", CID],
    ["--root", "/r", "create", "--bundle", "/b with space", "--pid-file", "/p", CID],
    ["--root", "/r", "exec", "--process", "/tmp/p.json", "--detach", CID],
    ["--root", "/r", "kill", CID, "9"],
    ["--root", "/r", "delete", "--force", CID],
    ["--root", "/r", "checkpoint", "--image-path", "/engine/img", "--work-path", "/w", CID],
    ["--root", "/r", "restore", "--image-path=/engine/img", "--bundle", "/b", CID],
]


@pytest.mark.parametrize("args", ORDINARY)
def test_calls_without_a_request_pass_unchanged(run, args: list[str]) -> None:
    assert run(*args) == args


def test_a_staged_checkpoint_goes_to_the_agents_folder(run) -> None:
    (run.requests / f"{CID}.checkpoint").write_text("/staging/m1/checkpoints/final\n\n")
    got = run("--root", "/r", "checkpoint", "--image-path", "/engine/img", "--work-path", "/w",
              "--leave-running", CID)
    assert got == ["--root", "/r", "checkpoint", "--image-path", "/staging/m1/checkpoints/final",
                   "--work-path", "/w", "--leave-running", CID]


def test_a_staged_restore_reads_from_the_agents_folder(run) -> None:
    (run.requests / f"{CID}.restore").write_text("/staging/m1/checkpoints/final\n")
    got = run("--root", "/r", "restore", "--image-path=/engine/img", "--bundle", "/b", CID)
    assert got == ["--root", "/r", "restore", "--image-path=/staging/m1/checkpoints/final",
                   "--bundle", "/b", CID]


def test_the_engines_folder_gets_content_of_its_own(run, tmp_path: Path) -> None:
    """containerd stores the engine's checkpoint folder by digest: empty ones collide."""
    engine = tmp_path / "engine-images"
    engine.mkdir()
    (run.requests / f"{CID}.checkpoint").write_text("/s/img\n\ntoken-1\n")
    run("--root", "/r", "checkpoint", "--image-path", str(engine), CID)
    assert (engine / "migctl-direct").read_text() == "token-1\n"
    (run.requests / f"{CID}.checkpoint").write_text("/s/img\n\ntoken-2\n")
    run("--root", "/r", "checkpoint", f"--image-path={engine}", CID)
    assert (engine / "migctl-direct").read_text() == "token-2\n"


def test_a_page_server_is_added_to_the_checkpoint_only(run) -> None:
    (run.requests / f"{CID}.checkpoint").write_text("/s/img\n10.0.0.2:27000\n")
    got = run("--root", "/r", "checkpoint", "--image-path", "/e", CID)
    assert got == ["--root", "/r", "checkpoint", "--image-path", "/s/img",
                   "--page-server", "10.0.0.2:27000", CID]


def test_a_lazy_checkpoint_runs_in_its_network_namespace(run) -> None:
    """Post-copy: CRIU's page server listens on every address of the namespace it runs in."""
    (run.requests / f"{CID}.checkpoint").write_text(
        "/s/img\n127.0.0.1:27000\ntok\nlazy\n/run/netns/migctl-pc-x\n")
    got = run("--root", "/r", "checkpoint", "--image-path", "/e", "--leave-running", CID)
    assert got == ["--root", "/r", "checkpoint", "--image-path", "/s/img", "--leave-running",
                   "--page-server", "127.0.0.1:27000", "--lazy-pages", CID,
                   "(in --net=/run/netns/migctl-pc-x)"]


def test_a_lazy_restore_finds_its_daemon_in_its_work_folder(run) -> None:
    (run.requests / f"{CID}.restore").write_text("/s/img\n\ntok\nlazy\n/s/lazy\n")
    got = run("--root", "/r", "restore", "--image-path", "/e", "--work-path", "/w", CID)
    assert got == ["--root", "/r", "restore", "--image-path", "/s/img", "--work-path", "/w",
                   "--lazy-pages", "--work-path", "/s/lazy", CID]


def test_a_request_for_another_container_or_action_changes_nothing(run) -> None:
    (run.requests / f"{'b' * 64}.checkpoint").write_text("/s/img\n")
    (run.requests / f"{CID}.restore").write_text("/s/img\n")
    args = ["--root", "/r", "checkpoint", "--image-path", "/e", CID]
    assert run(*args) == args


def test_a_relative_folder_is_refused(run) -> None:
    (run.requests / f"{CID}.checkpoint").write_text("../../etc\n")
    with pytest.raises(RuntimeError, match="absolute"):
        run("--root", "/r", "checkpoint", "--image-path", "/e", CID)


def test_a_request_lives_only_while_staged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(direct, "REQUEST_DIR", tmp_path / "rq")
    with direct.staged(CID, "restore", Path("/s/img")):
        assert (tmp_path / "rq" / f"{CID}.restore").read_text().startswith("/s/img\n\n")
    with direct.staged(CID, "checkpoint", Path("/s/img"), "127.0.0.1:1", True, Path("/n")):
        lines = (tmp_path / "rq" / f"{CID}.checkpoint").read_text().splitlines()
        assert lines[1] == "127.0.0.1:1" and lines[3:] == ["lazy", "/n", ""]
        assert (tmp_path / "rq").stat().st_mode & 0o077 == 0
    assert not (tmp_path / "rq" / f"{CID}.restore").exists()


@pytest.mark.parametrize("bad", ["../" + "a" * 61, "a" * 63, "A" * 64, "toytsm"])
def test_only_container_ids_name_a_request(tmp_path: Path, monkeypatch, bad: str) -> None:
    monkeypatch.setattr(direct, "REQUEST_DIR", tmp_path / "rq")
    with pytest.raises(RuntimeFailure), direct.staged(bad, "checkpoint", Path("/s")):
        pass


def test_the_probe_finds_the_wrapper_under_any_name() -> None:
    info = {"Runtimes": {"runc": {"path": "runc"},
                         "fast": {"path": "/opt/migctl/bin/migctl-runc"}}}
    assert direct.wrapper_runtime(info) == "fast"
    assert direct.wrapper_runtime({"Runtimes": {"runc": {"path": "runc"}}}) == ""


@pytest.mark.parametrize("args", ORDINARY)
def test_every_checkpoint_and_restore_closes_connections_unless_staged_to_keep_them(
        run, args: list[str]) -> None:
    """runc has CRIU read /etc/criu/runc.conf last, so tcp-close there would close every
    connection: the wrapper gives it per call instead, through CRIU_CONFIG_FILE."""
    run(*args)
    if "checkpoint" not in args and "restore" not in args:
        assert run.criu_config() == ""  # anything else is runc's alone
        return
    conf = Path(run.criu_config())
    assert conf == run.requests / "criu-tcp-close.conf"
    assert conf.read_text() == "tcp-close\n"


@pytest.mark.parametrize("action", ["checkpoint", "restore"])
@pytest.mark.parametrize("connections, closed", [("keep", False), ("", True), ("kept", True)])
def test_a_staged_call_keeps_connections_only_when_asked(run, action: str, connections: str,
                                                         closed: bool) -> None:
    (run.requests / f"{CID}.{action}").write_text(f"/staging/m1\n\ntok\n\n\n{connections}\n")
    # the engine's environment closes them for plain runc (docs/real-machines.md)
    run("--root", "/r", action, "--image-path", "/engine/img", CID,
        CRIU_CONFIG_FILE="/etc/migctl/criu-tcp-close.conf")
    assert run.criu_config() == ("" if not closed else
                                 str(run.requests / "criu-tcp-close.conf"))


def test_the_staged_request_says_keep_as_the_wrapper_reads_it(tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(direct, "REQUEST_DIR", tmp_path)
    with direct.staged(CID, "restore", Path("/i"), keep_connections=True):
        assert (tmp_path / f"{CID}.restore").read_text().splitlines()[5] == "keep"
    with direct.staged(CID, "restore", Path("/i")):
        assert (tmp_path / f"{CID}.restore").read_text().splitlines()[5] == ""


@pytest.mark.parametrize("conf, said", [
    ("tcp-established\ntcp-close\nfile-locks\n", "has tcp-close, which closes every"),
    ("file-locks\n", "has no tcp-established"),
    ("tcp-established\n skip-in-flight\nfile-locks\n", ""),
])
def test_runc_conf_must_leave_connections_to_each_call(tmp_path: Path, conf: str,
                                                       said: str) -> None:
    path = tmp_path / "runc.conf"
    path.write_text(conf)
    problem = direct.runc_conf_problem(path)
    assert (said in problem) if said else problem == ""
