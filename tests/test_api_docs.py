"""docs/api.md is exactly what scripts/gen-api-docs.py makes from proto/migctl.proto (and the
enforced roles), and every rpc's comment says who may call it and how it fails."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from migctl.agent.authz import ROLES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen-api-docs.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_api_docs_are_current(tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, cwd=tmp_path)
    assert out.read_text() == (ROOT / "docs" / "api.md").read_text(), \
        "docs/api.md is stale: run scripts/gen-proto.sh"


def test_every_rpc_documents_its_callers_and_errors(gen: ModuleType) -> None:
    file = gen.descriptor(ROOT / gen.PROTO)
    rpcs = gen.rpcs(file)
    assert {r.name for r in rpcs} == set(ROLES)
    for r in rpcs:
        assert r.callers, f"{r.name}: no 'Callers:' line"
        assert r.errors, f"{r.name}: no 'Errors:' line"
    assert gen.problems(file) == []
    docs = (ROOT / "docs" / "api.md").read_text()
    for r in rpcs:
        section = docs.split(f"\n### {r.name}\n", 1)[1].split("\n### ", 1)[0]
        assert f"- Callers: {', '.join(sorted(ROLES[r.name]))}" in section, r.name
        assert "- Errors:" in section, r.name


def test_a_comment_that_breaks_the_rules_is_named(gen: ModuleType, tmp_path: Path) -> None:
    proto = (ROOT / gen.PROTO).read_text()
    broken = (proto.replace("  // Callers: operator, node.\n", "  // Callers: operator.\n", 1)
              .replace("  // Errors: NOT_FOUND: no such image;", "  // Errors: MISSING: no image;")
              .replace("  // Errors: none of its own.\n", ""))
    assert broken.count("Errors:") == proto.count("Errors:") - 1
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "migctl.proto").write_text(broken)
    found = gen.problems(gen.descriptor(tmp_path / "proto" / "migctl.proto"))
    assert any(p.startswith("GetNode: the proto's 'Callers: operator.'") for p in found)
    assert any(p.startswith("ImageConfig: error 'MISSING'") for p in found)
    assert "Probe: no 'Errors:' line in its comment" in found
    assert len(found) == 3, found
