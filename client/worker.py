"""The institution's warm worker: one long-lived process runs every ClientApp message.

Flower starts a new ``flwr-clientapp`` process for every message, and importing
torch, transformers and Opacus there costs seconds before any work
(``bench/round_anatomy.py``). ``flower-client`` starts this worker once beside its
SuperNode and names its socket in the node config (``worker-socket``); the ClientApp
process then only forwards each message and returns the reply. The worker runs one
message at a time and keeps imports, tokenised data and encoder features in memory.

The socket lives in a private temporary folder (mode 0700, socket 0600), so only the
institution's own account, which already runs the SuperNode and this code, can
connect. Messages travel pickled: never expose the socket to anyone else.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedsilo.common.logs import configure_logging
from fedsilo.common.processes import stop_group

log = logging.getLogger("fedsilo.client.worker")  # also when run as __main__

#: Node-config key naming the worker's socket (set by flower-client, not client.toml).
SOCKET_KEY = "worker-socket"


@dataclass(frozen=True)
class Origin:
    """The ``flwr-clientapp`` process a message reached, as it tells the worker.

    ``age`` is its age on entry (start-up and imports); ``app_dir`` the Flower app
    bundle it was loaded from, which an approved agreement's ``app-sha256`` must match:
    the worker itself was not loaded from any bundle.
    """

    age: float | None
    app_dir: Path | None


Handler = Callable[[Message, Context, Origin], Message]
_HEADER = struct.Struct("!Q")
_PARENT_CHECK_SECONDS = 5.0


class WorkerUnavailable(ConnectionError):
    """No worker accepts connections at the socket."""


class WorkerFailed(RuntimeError):
    """The worker raised while running the message; the text is its traceback."""


def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> Any:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return pickle.loads(_recv_exact(sock, size))


def call(path: Path, kind: str, msg: Message, context: Context, origin: Origin) -> Message:
    """Run one message in the worker at ``path``; return the reply built against ``msg``.

    Raises
    ------
    WorkerUnavailable
        If nothing listens at ``path`` (nothing was sent).
    WorkerFailed
        If the handler raised in the worker.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as err:
            raise WorkerUnavailable(f"no warm worker at {path} ({err})") from None
        _send(sock, (kind, msg, context, origin))
        status, payload, state = _recv(sock)
    if status != "ok":
        raise WorkerFailed(f"the warm worker failed on the {kind} message:\n{payload}")
    context.state = state
    return Message(payload, reply_to=msg)


def _handle(conn: socket.socket, handlers: Mapping[str, Handler]) -> None:
    try:
        kind, msg, context, origin = _recv(conn)
    except (ConnectionError, EOFError, pickle.UnpicklingError, ValueError) as err:
        log.warning("warm worker: unreadable request (%s); ignored", err)
        return
    try:
        reply = handlers[kind](msg, context, origin)
        out = ("ok", reply.content if reply.has_content() else reply.error, context.state)
    except Exception:  # noqa: BLE001 - reported to the ClientApp, which fails the message
        log.exception("warm worker: the %s message failed", kind)
        out = ("failed", traceback.format_exc(), None)
    try:
        _send(conn, out)
    except OSError as err:
        log.warning("warm worker: the ClientApp left before the %s reply (%s)", kind, err)


def serve(path: Path, load: Callable[[], Mapping[str, Handler]],
          parent: int | None = None) -> None:
    """Answer messages at ``path`` one at a time until ``parent`` (a pid) is gone.

    The socket is bound first, so the ClientApp can connect at once; ``load`` (the
    slow imports) runs next, while early requests wait in the backlog.
    """
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(8)
        handlers = load()
        server.settimeout(_PARENT_CHECK_SECONDS)
        log.info("warm worker ready at %s", path)
        while parent is None or os.getppid() == parent:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                _handle(conn, handlers)
    log.info("warm worker: flower-client is gone; stopping")


def start(env: Mapping[str, str]) -> tuple[subprocess.Popen, Path]:
    """Start a worker in its own private folder; return the process and its socket."""
    folder = Path(tempfile.mkdtemp(prefix="fedsilo-worker-"))  # mode 0700
    path = folder / "worker.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fedsilo.client.worker", str(path),
                             "--parent", str(os.getpid())], env=dict(env),
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not path.exists():
        log.warning("the warm worker did not start (exit %s); every message will run in "
                    "its own ClientApp process", proc.poll())
    return proc, path


def stop(proc: subprocess.Popen, path: Path) -> None:
    """Stop the worker and remove its private folder."""
    stop_group(proc)
    shutil.rmtree(path.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m fedsilo.client.worker SOCKET --parent PID``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("socket", type=Path)
    parser.add_argument("--parent", type=int, default=None)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        serve(args.socket, _handlers, args.parent)
    finally:
        args.socket.unlink(missing_ok=True)


def _handlers() -> dict[str, Handler]:
    from fedsilo.client import tasks  # torch, transformers, Opacus: imported once

    return {"train": tasks.train, "evaluate": tasks.evaluate_local}


if __name__ == "__main__":
    main()
