"""Installed, migctl is one namespace (`migctl.agent`, `migctl.client`, `migctl.proto`): no
source imports the repository's folders by their top-level names, which would load a second
copy of a module (two journals, two error classes) beside the namespace's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = re.compile(r"^\s*(?:from|import)\s+(agent|client|proto|lab|common)\b", re.M)
MODULE = re.compile(r"(?:-m[\"',\s]+|python -m )(agent|client|proto|lab|common)\.")


def sources() -> list[Path]:
    found = []
    for folder in ("agent", "client", "proto", "tests", "bench", "examples", "scripts", "lab",
                   "common"):
        found += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh")
                  and p.is_file()]
    return found


def test_nothing_imports_the_folders_by_their_top_level_names() -> None:
    bad = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in sources()
           for m in [*TOP.finditer(p.read_text()), *MODULE.finditer(p.read_text())]]
    assert bad == []


def test_the_namespace_links_the_repositorys_folders() -> None:
    for name in ("agent", "client", "proto", "lab", "common"):
        link = ROOT / "migctl" / name
        assert link.is_symlink() and link.resolve() == ROOT / name


def test_the_loaded_modules_are_the_namespaces() -> None:
    import sys

    import migctl.client.cli  # noqa: F401 - loads the client and, through it, the agent's parts

    folders = ("agent", "client", "proto", "lab", "common")
    assert not [m for m in sys.modules if m.split(".")[0] in folders]


def test_the_client_proper_reaches_no_tool_and_no_agent_internals() -> None:
    """client/ is the Python API and the CLI: the lab and the evaluation are tools of their
    own (migctl.lab), and neither the client nor they reach the migration's or the runtime's
    insides, but for the lab's engines (the runc wrapper the installer registers too) and the
    seed's method, which checkpoints and restores with the agent's own runtime so that only
    the transfer differs from migctl's."""
    allowed = {("lab/nodes.py", "migctl.agent.runtime.direct"),
               ("lab/seedmethod.py", "migctl.agent.runtime.docker")}
    bad = []
    for p in sources():
        rel = str(p.relative_to(ROOT))
        if not rel.startswith(("client/", "lab/")) or p.suffix != ".py":
            continue
        for m in re.finditer(r"^\s*from (migctl\.[\w.]+) import", p.read_text(), re.M):
            mod = m.group(1)
            inside = mod.startswith(("migctl.agent.migration", "migctl.agent.runtime"))
            tool = rel.startswith("client/") and mod.startswith("migctl.lab") and \
                rel != "client/cli.py"
            if (inside and (rel, mod) not in allowed) or tool:
                bad.append(f"{rel}: {mod}")
    assert bad == []

