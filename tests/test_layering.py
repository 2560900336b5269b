"""The app split stays acyclic: common imports neither side; client and server not each other."""

import ast
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
