"""Installed, migctl is one namespace (`migctl.agent`, `migctl.client`, `migctl.proto`): no
source imports the repository's folders by their top-level names, which would load a second
copy of a module (two journals, two error classes) beside the namespace's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = re.compile(r"^\s*(?:from|import)\s+(agent|client|proto)\b", re.M)
MODULE = re.compile(r"(?:-m[\"',\s]+|python -m )(agent|client|proto)\.")


def sources() -> list[Path]:
    found = []
    for folder in ("agent", "client", "proto", "tests", "bench", "examples", "scripts", "lab"):
        found += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh")
                  and p.is_file()]
    return found


def test_nothing_imports_the_folders_by_their_top_level_names() -> None:
    bad = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in sources()
           for m in [*TOP.finditer(p.read_text()), *MODULE.finditer(p.read_text())]]
    assert bad == []


def test_the_namespace_links_the_repositorys_folders() -> None:
    for name in ("agent", "client", "proto"):
        link = ROOT / "migctl" / name
        assert link.is_symlink() and link.resolve() == ROOT / name


def test_the_loaded_modules_are_the_namespaces() -> None:
    import sys

    import migctl.client.cli  # noqa: F401 - loads the client and, through it, the agent's parts

    assert not [m for m in sys.modules if m.split(".")[0] in ("agent", "client", "proto")]

