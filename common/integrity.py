"""Fingerprints of what a run executes: fedsilo's code, the app bundle, the model files.

Both sides compute them the same way: the coordinator when it issues a federation
agreement, the institution before it lends its data to a run (see
:mod:`fedsilo.common.agreement`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tomllib
from functools import cache
from pathlib import Path

PACKAGES = ("fedsilo.common", "fedsilo.client", "fedsilo.server")

#: Model files whose bytes identify a checkpoint (weights, architecture, tokenizer).
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt",
               "tokenizer.json", "tokenizer_config.json")


#: Each file's last SHA-256, with the stat fields any write changes (as git's index).
_DIGESTS: dict[Path, tuple[tuple[int, ...], bytes]] = {}


def file_sha256(path: Path) -> bytes:
    """SHA-256 of one file, reused while its size, inode, mtime and ctime are unchanged.

    A long-lived process (the institution's runtime) checks the same model files
    before every round; rereading 90 MB each time cost 0.13–0.18 s. Any write to the
    file changes its ctime, which no unprivileged process can set back.
    """
    path, st = path.resolve(), path.stat()
    stamp = (st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)
    known = _DIGESTS.get(path)
    if known is None or known[0] != stamp:
        known = _DIGESTS[path] = (stamp, hashlib.sha256(path.read_bytes()).digest())
    return known[1]


def _files_sha256(root: Path, files: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in sorted(files):
        sha.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        sha.update(file_sha256(path))
    return sha.hexdigest()


@cache
def code_sha256() -> str:
    """SHA-256 over every Python file of the installed fedsilo packages."""
    sha = hashlib.sha256()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            root = Path(location)
            sha.update(package.encode() + _files_sha256(root, list(root.rglob("*.py"))).encode())
    return sha.hexdigest()


def model_sha256(folder: str | Path) -> str:
    """SHA-256 over a checkpoint folder's weight, config and tokenizer files."""
    root = Path(folder)
    files = [root / name for name in MODEL_FILES if (root / name).is_file()]
    if not files:
        raise FileNotFoundError(f"model folder {root} has none of {', '.join(MODEL_FILES)}")
    return _files_sha256(root, files)


def app_sha256(folder: Path) -> str:
    """SHA-256 of a Flower app bundle, without its run config.

    Covers every file of the bundle (except Flower's ``.info`` index) and, of its
    ``pyproject.toml``, the project, dependencies and components: everything that
    decides which code runs. The ``[tool.flwr.app.config]`` table holds the run's
    settings, which an agreement checks term by term instead.
    """
    doc = tomllib.loads((folder / "pyproject.toml").read_text("utf-8"))
    project = doc.get("project", {})
    flwr = doc.get("tool", {}).get("flwr", {}).get("app", {})
    identity = {"name": project.get("name"), "dependencies": project.get("dependencies"),
                "publisher": flwr.get("publisher"), "components": flwr.get("components")}
    others = [p for p in folder.rglob("*") if p.is_file() and p.name != "pyproject.toml"
              and ".info" not in p.relative_to(folder).parts
              and "__pycache__" not in p.parts]
    sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8"))
    sha.update(_files_sha256(folder, others).encode())
    return sha.hexdigest()

