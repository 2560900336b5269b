"""The runtime outlives its tasks: a task the SuperNode drops ends that task only.

When a coordinator dies mid-round and comes back, the SuperNode drops the old run's
task while the runtime may still be training it: the runtime's next call is answered
401 (the task's token is gone) or 403 (the run stopped). Flower's own retry policy,
written for a one-task ``flwr-clientapp``, answers both by ending the whole process
(SIGINT, or a ``BaseException``); the institution then left the federation and the
resumed run waited for it forever. Flower 1.42's SuperNode also leaves behind a task
whose run stopped while it was receiving the message: its objects never come, and the
runtime, which takes one task at a time, must not wait for them for hours.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Callable

import pytest
from flwr.app import Message
from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PushTaskOutputResponse, SendTaskHeartbeatResponse
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

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


class _Orphaned(http.server.BaseHTTPRequestHandler):
    """A runtime API whose task's message objects never become available."""

    ANSWERS: dict[str, Callable[[], bytes]] = {
        "/v1/runtime/pull-object": lambda: PullObjectResponse(
            object_found=True, object_available=False).SerializeToString(),
        "/v1/runtime/send-task-heartbeat": lambda: SendTaskHeartbeatResponse(
            success=True).SerializeToString(),
        "/v1/runtime/push-task-output": lambda: PushTaskOutputResponse().SerializeToString(),
    }

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = self.ANSWERS[self.path]()
        self.send_response(200)
        self.send_header("Content-Type", "application/protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _take(handler: type[http.server.BaseHTTPRequestHandler], tmp_path,
          status: int = 200) -> list[object]:
    """Run one task against a loopback runtime API served by ``handler``; what came out."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
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
    return outcome


@pytest.mark.parametrize("status", [401, 403])
def test_a_task_the_supernode_no_longer_accepts_ends_the_task_not_the_runtime(
        status, tmp_path, monkeypatch):
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))
    outcome = _take(_Refusing, tmp_path, status)
    assert not signals, "the runtime signalled itself to stop"
    assert outcome == [False]  # the task ended, refused; nothing escaped to serve()


def test_a_task_whose_message_never_arrives_ends_instead_of_holding_the_runtime(
        tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "TASK_RETRY_SECONDS", 2.0)

    def pull_task_input(client):  # the message part of Flower's pull_task_input
        pull = make_pull_object_fn_protobuf(client.PullObject, Node(node_id=1), 1)
        return pull_and_inflate_object_from_tree(ObjectTree(object_id="a" * 64), pull,
                                                 lambda _: None, return_type=Message)

    monkeypatch.setattr(runtime, "pull_task_input", pull_task_input)
    assert _take(_Orphaned, tmp_path) == [False]  # Flower alone would wait two hours
