"""The runtime outlives its tasks: a task the SuperNode drops ends that task only.

When a coordinator dies mid-round and comes back, the SuperNode drops the old run's
task while the runtime may still be training it: the runtime's next call is answered
401 (the task's token is gone) or 403 (the run stopped). Flower's own retry policy,
written for a one-task ``flwr-clientapp``, answers both by ending the whole process
(SIGINT, or a ``BaseException``); the institution then left the federation and the
resumed run waited for it forever.
"""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from fedsilo.client import runtime


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A runtime API that answers every call with the server's ``status``."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status", [401, 403])
def test_a_task_the_supernode_no_longer_accepts_ends_the_task_not_the_runtime(
        status, tmp_path, monkeypatch):
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    server.status = status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    outcome: list[object] = []

    def take() -> None:
        try:
            outcome.append(runtime.run_task(f"127.0.0.1:{server.server_port}", "token",
                                            tmp_path))
        except BaseException as err:  # noqa: BLE001 - what escapes is the finding
            outcome.append(err)

    worker = threading.Thread(target=take, daemon=True)
    worker.start()
    worker.join(60)
    server.shutdown()
    assert not signals, "the runtime signalled itself to stop"
    assert outcome == [False]  # the task ended, refused; nothing escaped to serve()
