"""The app split stays acyclic: common imports neither side; client and server not each other."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"common": ("fedsilo.client", "fedsilo.server"),
             "client": ("fedsilo.server",),
             "server": ("fedsilo.client",)}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_cross_imports(package):
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path)
        if name.startswith(FORBIDDEN[package])
    }
    assert not offenders


def test_no_module_is_overlong():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in ROOT.glob("[!.]*/*.py")
            if (n := len(p.read_text("utf-8").splitlines())) > 420]
    assert not long


def test_readme_is_a_guide_with_measurements_in_docs():
    readme = (ROOT / "README.md").read_text("utf-8")
    assert len(readme.splitlines()) <= 300
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text("utf-8")
    for script in sorted((ROOT / "bench").glob("*.py")):
        if script.name != "benchlib.py":
            assert f"bench/{script.name}" in benchmarks, f"docs/benchmarks.md lacks {script.name}"


def named_modules(text: str) -> set[str]:
    """Module paths a doc names in backticks (``client/…``, ``server/…``, … ending in .py)."""
    return set(re.findall(r"`((?:client|server|common|simulations)/[\w/]+\.py)`", text))


def test_named_modules_catches_a_missing_path():
    doc = "`server/gate.py` `client/nowhere.py` `tests/x.py` `common/atomic.py` `plain.py`"
    assert named_modules(doc) == {"server/gate.py", "client/nowhere.py", "common/atomic.py"}


def test_architecture_names_only_modules_that_exist():
    doc = (ROOT / "docs" / "architecture.md").read_text("utf-8")
    named = named_modules(doc)
    assert len(named) > 20, "docs/architecture.md should walk the round through the modules"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
