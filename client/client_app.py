"""The fedsilo ClientApp: each message runs fedsilo's tasks on the institution's data.

At an institution this object runs in fedsilo's runtime (:mod:`fedsilo.client.runtime`),
imported from the installed package after the run's app bundle was checked against the
approved agreement; in a simulation, in Flower's simulation engine. Loaded any other
way (from a bundle by Flower's own ``flwr-clientapp``) no bundle was checked, so a
deployed institution declines every run (:func:`fedsilo.client.agreements.check_run`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsilo.client.runtime_bundle import current_origin
from fedsilo.client.secagg import secagg_mod
from fedsilo.common.logs import configure_logging

app = ClientApp(mods=[secagg_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global tensors locally and reply with the update."""
    origin = current_origin()
    configure_logging()
    from fedsilo.client import handlers  # torch, transformers, Opacus: once per process

    return handlers.train(msg, context, origin)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global tensors on the institution's held-out data."""
    origin = current_origin()
    configure_logging()
    from fedsilo.client import handlers

    return handlers.evaluate_local(msg, context, origin)
