"""`migctl completion SHELL` prints a script made from the CLI's own parser (shtab), which the
shell accepts and which offers the subcommands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["migrate", "evacuate", "status", "watch", "cancel", "nodes", "ps", "plan",
               "history", "certs", "lab", "bench", "completion"]


def _script(shell: str) -> str:
    return subprocess.run([sys.executable, "-m", "migctl.client.cli", "completion", shell],
                          cwd=ROOT, check=True, capture_output=True, text=True).stdout


def test_bash_completion_parses_and_names_the_subcommands(tmp_path: Path) -> None:
    script = _script("bash")
    assert f"_shtab_migctl_subparsers=({' '.join(SUBCOMMANDS)})" in script
    assert "_shtab_migctl_lab_subparsers=(up down env link links toy)" in script
    assert "_shtab_migctl_bench_subparsers=(run summary plots)" in script
    assert "--allow-privileged" in script and "--tls-dir" in script
    (tmp_path / "migctl.bash").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "migctl.bash")], check=True)
    # sourced into a shell, it registers itself for migctl
    out = subprocess.run(["bash", "-c", f"source {tmp_path / 'migctl.bash'} && complete -p migctl"],
                         check=True, capture_output=True, text=True).stdout
    assert "migctl" in out


def test_zsh_completion_names_the_subcommands(tmp_path: Path) -> None:
    script = _script("zsh")
    assert script.startswith("#compdef migctl")
    for name in SUBCOMMANDS:
        assert f"\n    {name}:" in script, name
    if shutil.which("zsh"):
        (tmp_path / "_migctl").write_text(script)
        subprocess.run(["zsh", "-n", str(tmp_path / "_migctl")], check=True)


def test_an_unknown_shell_is_refused() -> None:
    res = subprocess.run([sys.executable, "-m", "migctl.client.cli", "completion", "fish"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert "invalid choice: 'fish'" in res.stderr

