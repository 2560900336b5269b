"""The fedsilo ClientApp: forward each message to the institution's warm worker.

This module is what every ``flwr-clientapp`` process loads, so it imports only Flower
and fedsilo's light modules. When the node config names a warm worker
(:mod:`fedsilo.client.worker`, started by ``flower-client``) the message runs there;
otherwise (a simulation, a plain ``flower-supernode``, or a worker that is not up)
it runs here, in :mod:`fedsilo.client.tasks`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsilo.client import worker
from fedsilo.client.messages import secagg_mod
from fedsilo.common.integrity import installed_app_dir
from fedsilo.common.logs import configure_logging
from fedsilo.common.processes import process_age

log = logging.getLogger(__name__)

app = ClientApp(mods=[secagg_mod])


def _run(kind: str, msg: Message, context: Context) -> Message:
    age = process_age()  # this process's start-up and imports
    configure_logging()
    origin = worker.Origin(age, installed_app_dir())
    socket = context.node_config.get(worker.SOCKET_KEY)
    if socket:
        try:
            return worker.call(Path(str(socket)), kind, msg, context, origin)
        except worker.WorkerUnavailable as err:
            log.warning("%s; running the %s message in this process", err, kind)
    from fedsilo.client import tasks  # the heavy imports, only without a worker

    if kind == "train":
        return tasks.train(msg, context, origin)
    return tasks.evaluate_local(msg, context, origin)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global tensors locally and reply with the update."""
    return _run("train", msg, context)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global tensors on the institution's held-out data."""
    return _run("evaluate", msg, context)
