"""fedsilo's runtime: the only process that runs a coordinator's messages at an institution.

Flower's SuperNode stores each message with the run's app bundle (FAB) and, under
``--isolation process``, waits for an outside process to take the task through its
runtime API on loopback. Flower's own ``flwr-clientapp`` would install the bundle, put
its folder first on ``sys.path`` and import the ClientApp it names: a coordinator's
bundle could run its own code, or shadow ``fedsilo`` or ``opacus``, and read the node
config with the data path. This process takes the tasks instead, as
``flwr/supernode/runtime/run_clientapp.py`` does (acquire, pull inputs and message,
push reply and context), but never installs, imports or executes the bundle: it hashes
the bundle's bytes and, when an agreement the institution approved pins that hash, runs
the ClientApp of the fedsilo package installed here
(:data:`fedsilo.client.client_app.app`). Any other bundle gets an error reply with
:data:`~fedsilo.common.wire.DECLINED_CODE` and a generic reason, and is journalled.

The process lives as long as ``flower-client``: imports, tokenised data and encoder
features stay warm from message to message. Written against the runtime API of
flwr 1.42 (pinned in ``pyproject.toml``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedsilo.client.client_app import app
from fedsilo.client.runtime_bundle import Origin, approved, serving
from fedsilo.common import journal
from fedsilo.common.logs import configure_logging
from fedsilo.common.processes import SUPEREXEC_POLL
from fedsilo.common.wire import DECLINED_CODE

log = logging.getLogger("fedsilo.client.runtime")  # also when run as __main__

#: The reason a refused bundle's reply carries (nothing about the bundle or the data).
REFUSED = ("declined: this institution runs only its own installed fedsilo, for the app "
           "bundle its approved agreement names; this run's bundle is not that one")
#: What a failed message's reply carries; the details stay in the institution's log.
FAILED = "the institution could not run this message; details are in its own log"
_COMPONENT = "flwr-clientapp"  # the runtime API's name for what takes ClientApp tasks
_ACQUIRE = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # what the shared secret signs
#: Statuses worth retrying within a task: the SuperNode busy or restarting.
_TRANSIENT = frozenset({502, 503, 504})
#: Seconds one task's call keeps retrying a SuperNode that does not answer.
TASK_RETRY_SECONDS = 120.0


def _task_retries() -> RetryInvoker:
    """Flower's runtime-API retries, fitted to a process that outlives its tasks.

    Flower's invoker belongs to a one-task ``flwr-clientapp``: a task the SuperNode no
    longer accepts (401: its token expired with the run; 403: the run stopped) ends the
    whole process, by SIGINT or a ``BaseException``. Here such a reply ends the task
    only, at its next call to the SuperNode (a training under way runs to its end), as
    an ``httpx.HTTPStatusError``; a SuperNode that stays silent ends it after
    :data:`TASK_RETRY_SECONDS`. The runtime goes on to the next task (a coordinator that
    restarts mid-round must find every institution still there).
    """
    retries = make_simple_http_retry_invoker()
    retries.should_giveup = lambda err: (isinstance(err, httpx.HTTPStatusError)
                                         and err.response.status_code not in _TRANSIENT)
    retries.max_time = TASK_RETRY_SECONDS
    return retries


class StalledTask(RuntimeError):
    """The SuperNode made none of a task's message objects available in time."""


def _stall_guard(pull: Callable[[PullObjectRequest], PullObjectResponse],
                 seconds: float) -> Callable[[PullObjectRequest], PullObjectResponse]:
    """``pull`` (PullObject) that gives up once no object became available for ``seconds``.

    Flower 1.42's SuperNode creates a task before it pulls the message's objects from the
    SuperLink, and leaves it behind when the run stops meanwhile ("not in `RUNNING`
    status. Ignoring message"): the objects never come, and Flower's pull waits up to two
    hours while this runtime, which takes one task at a time, holds back every later one
    (a resumed run's first). A slow link still delivers objects one by one, which resets
    the clock.
    """
    last = time.monotonic()

    def guarded(request: PullObjectRequest) -> PullObjectResponse:
        nonlocal last
        response = pull(request)
        if response.object_available:
            last = time.monotonic()
        elif time.monotonic() - last > seconds:
            raise StalledTask(f"no object of the task's message became available for "
                              f"{seconds:.0f} s (a message of a run that stopped)")
        return response

    return guarded


def _client(address: str, token: str | None = None,
            secret: bytes | None = None) -> RuntimeHttpClient:
    """A runtime API client: with a task's ``token``, or signing AcquireTask with ``secret``."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=_COMPONENT)]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                         protected_methods=_ACQUIRE))
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors,
        retry_invoker=_task_retries() if token else make_simple_http_retry_invoker())
    if token:
        client.PullObject = _stall_guard(client.PullObject, TASK_RETRY_SECONDS)  # type: ignore[method-assign]
    return client


def _heartbeat(client: RuntimeHttpClient) -> HeartbeatSender:
    """Keep the task alive while it runs (Flower's own sender ends the process on refusal)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            if not client.SendTaskHeartbeat(request).success:
                log.warning("the SuperNode no longer knows this task")
        except httpx.HTTPError:
            return False
        return True

    return HeartbeatSender(beat)


def _run_app(message: Message, context: Context, origin: Origin) -> Message:
    """Run the installed fedsilo ClientApp on ``message`` (never the bundle's)."""
    with serving(origin):
        return app(message=message, context=context)


def run_task(address: str, token: str, ledger_dir: Path) -> bool:
    """Take one ClientApp task with ``token``; return whether it ran (False: refused)."""
    started = time.monotonic()
    client = _client(address, token)
    beats = _heartbeat(client)
    beats.start()
    context: Context | None = None
    status, details, ran = SubStatus.FAILED, FAILED, False
    try:
        message, context, run, fab = pull_task_input(client)
        ok, digest = approved(fab.content, ledger_dir)
        if not ok:
            log.error("refused the app bundle of run %s (%s %s, app-sha256 %s): no agreement "
                      "this institution approved names it; nothing of it was installed or "
                      "run", run.run_id, run.fab_id, run.fab_version, digest)
            journal.append(ledger_dir / "journal.jsonl", "bundle-refused", run=run.run_id,
                           fab_id=run.fab_id, fab_version=run.fab_version,
                           fab_sha256=fab.hash_str, app_sha256=digest)
            reply = Message(Error(code=DECLINED_CODE, reason=REFUSED), reply_to=message)
            details = REFUSED
        else:
            try:
                reply = _run_app(message, context, Origin(time.monotonic() - started, digest))
                status, details, ran = SubStatus.COMPLETED, "", True
            except Exception:  # noqa: BLE001 - reported generically, logged here in full
                log.exception("the %s message of run %s failed", message.metadata.message_type,
                              run.run_id)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=FAILED), reply_to=message)
        push_message(client, reply, context)
    except (httpx.HTTPError, RuntimeError) as err:
        log.error("runtime API: the task could not be completed (%s)", err)
    finally:
        if beats.is_running:
            beats.stop()
        # Best effort (Flower logs a refusal): the SuperNode may have dropped the task.
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
    return ran


def serve(address: str, ledger_dir: Path, poll: float, secret: bytes | None = None) -> None:
    """Take the SuperNode's ClientApp tasks at ``address`` one at a time, forever.

    With ``secret`` (the SuperNode's ``--superexec-auth-secret-file``) the SuperNode
    hands tasks to no other local process.
    """
    client = _client(address, secret=secret)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log.info("fedsilo runtime serving the SuperNode's runtime API at %s", address)
    while True:
        try:
            acquired = client.AcquireTask(request)
        except httpx.HTTPError as err:
            log.debug("runtime API not answering yet (%s)", err)
            acquired = None
        if acquired is not None and acquired.HasField("task") and acquired.token:
            try:
                run_task(address, acquired.token, ledger_dir)
            except Exception:  # noqa: BLE001 - one broken task must not stop the node
                log.exception("runtime: task of run %s failed", acquired.task.run_id)
            continue
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -P -m fedsilo.client.runtime ADDRESS --ledger-dir DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="the SuperNode's runtime API, HOST:PORT on loopback")
    parser.add_argument("--ledger-dir", type=Path, required=True,
                        help="the institution's ledger folder (approved agreements, journal)")
    parser.add_argument("--secret-file", type=Path, default=None,
                        help="the secret the SuperNode checks before handing out a task")
    parser.add_argument("--parent", type=int, default=None,
                        help="exit when this process (flower-client) is gone")
    args = parser.parse_args(argv)
    configure_logging()
    if args.parent is not None:
        start_parent_process_monitor(args.parent)
    name, default = SUPEREXEC_POLL
    try:
        serve(args.address, args.ledger_dir, float(os.environ.get(name, default)),
              args.secret_file.read_bytes() if args.secret_file else None)
    except KeyboardInterrupt:
        log.info("fedsilo runtime: flower-client is gone; stopping")


if __name__ == "__main__":
    main()
