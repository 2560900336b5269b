"""The app bundle a run came with, checked as data: hashed, never installed or imported.

Flower ships each run's app bundle (FAB, a zip) to the institution. fedsilo's runtime
(:mod:`fedsilo.client.runtime`) runs the fedsilo the institution installed, whatever
the bundle says; the bundle only decides *whether* it runs: its hash must be one an
agreement the institution approved pins (``app-sha256``).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedsilo.client.agreements import approved_bundles
from fedsilo.common.integrity import app_sha256
from fedsilo.common.processes import process_age


@dataclass(frozen=True)
class Origin:
    """How a message reached fedsilo's tasks.

    ``age`` is the seconds spent before the task started (a fresh process's start-up and
    imports, or the runtime's pull of the inputs); ``app_sha256`` the hash of the app
    bundle the run came with, which the runtime computed from its bytes (None: the
    message did not come through the runtime, so no bundle was checked).
    """

    age: float | None
    app_sha256: str | None


_ORIGIN: contextvars.ContextVar[Origin | None] = contextvars.ContextVar("fedsilo_origin",
                                                                        default=None)


@contextlib.contextmanager
def serving(origin: Origin) -> Iterator[None]:
    """Run the ClientApp under ``origin`` (the runtime's checked bundle)."""
    token = _ORIGIN.set(origin)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def current_origin() -> Origin:
    """The origin the runtime set, or this process's age and no bundle."""
    return _ORIGIN.get() or Origin(process_age(), None)


class BundleError(ValueError):
    """The bundle is not a readable Flower app bundle."""


def bundle_sha256(fab: bytes) -> str:
    """The ``app-sha256`` of a FAB's bytes, as :func:`app_sha256` computes it for a folder.

    The zip's files are written to a private temporary folder only to be hashed there;
    the folder is never put on ``sys.path`` and is removed before this returns.

    Raises
    ------
    BundleError
        If the bytes are not a zip, or a member's name leaves the folder.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive, \
                tempfile.TemporaryDirectory(prefix="fedsilo-bundle-") as tmp:
            for info in archive.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                    raise BundleError(f"bundle member {info.filename!r} leaves its folder")
                if not info.is_dir():
                    target = Path(tmp, *name.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(info))
            return app_sha256(Path(tmp))
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as err:
        if isinstance(err, BundleError):
            raise
        raise BundleError(f"not a readable app bundle ({err})") from None


def approved(fab: bytes, ledger_dir: Path) -> tuple[bool, str]:
    """Whether an agreement in force at ``ledger_dir`` pins this bundle; and its hash."""
    try:
        digest = bundle_sha256(fab)
    except BundleError as err:
        return False, f"unreadable: {err}"
    return digest in approved_bundles(ledger_dir), digest
