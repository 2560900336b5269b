"""One institution's work for each ClientApp message: DP-SGD training and local evaluation.

:mod:`fedsilo.client.client_app` calls these, at an institution inside fedsilo's
runtime (:mod:`fedsilo.client.runtime`), a long-lived process.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update
from torch.utils.data import TensorDataset
from transformers import PreTrainedModel

from fedsilo.client import budget, evaluation, privacy, replay
from fedsilo.client.agreements import check_run
from fedsilo.client.ledger import dataset_key, keep_update
from fedsilo.client.messages import (
    Request,
    evaluate_reply,
    generic_errors,
    read_request,
    released_arrays,
    train_reply,
)
from fedsilo.client.policy import (
    Policy,
    PolicyError,
    evaluation_release,
    institution_config,
)
from fedsilo.client.prepared import prepared_data, stamp
from fedsilo.client.received import ReceivedModelError, check_model
from fedsilo.client.runtime_bundle import Origin
from fedsilo.client.settings import LEDGER_KEY, NAME_KEY
from fedsilo.client.train import Correction, TrainResult, train_plain, train_private
from fedsilo.common import features, journal
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.logs import configure_logging
from fedsilo.common.model import (
    get_trainable_state,
    load_model,
    resolve_device,
    set_trainable_state,
)
from fedsilo.common.splits import (
    InstitutionData,
)
from fedsilo.common.task import evaluate, federation_labels
from fedsilo.common.wire import (
    DECLINED_CODE,
    EVALUATE_RECEIVED_KEY,
    RECEIVED_PREFIX,
    RUN_KEY,
    UNIFORM_WEIGHT_KEY,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Task:
    """Everything one train/evaluate message works with."""

    cfg: FedsiloConfig
    policy: Policy
    data: InstitutionData
    fingerprint: str
    train_set: TensorDataset
    test_set: TensorDataset
    model: PreTrainedModel
    net: torch.nn.Module  # what trains and evaluates: the model, or its head on features
    device: torch.device
    received: dict[str, np.ndarray]
    timings: dict[str, float]
    run: int  # the run's key: its first Flower run id, the same after a --resume
    deidentify: dict[str, object]  # what was scrubbed: kinds and counts per file, no values
    #: The record count every released value follows (``declared-examples``, else exact).
    released_count: int


def _setup(request: Request, context: Context, origin: Origin, evaluate: bool = False) -> _Task:
    """Resolve settings, load this institution's data and the received global model.

    The received model is checked (:mod:`fedsilo.client.received`) before it is loaded.
    """
    configure_logging()
    cfg = FedsiloConfig.from_flat(context.run_config, origin="run config")
    node = context.node_config
    if "partition-id" in node:  # a virtual institution of a simulation
        partition = (int(node["partition-id"]), int(node["num-partitions"]))
        # A virtual institution scrubs what the run's floor asks (--deidentify: every kind).
        name = ""
        policy = Policy(deidentify=DeidSettings(kinds=cfg.privacy.deidentify_floor),
                        evaluation=evaluation_release(node, simulated=True))
    else:  # a real institution: its node config holds its data and privacy policy
        if not node.get(LEDGER_KEY):  # approved agreements live beside the ledger
            raise PolicyError("this SuperNode's node config names no ledger-dir; start it "
                              "with `flower-client --config client.toml`, which passes it")
        check_run(cfg, Path(str(node[LEDGER_KEY])), origin.app_sha256)  # before any data is read
        cfg, policy = institution_config(cfg, node)
        partition, name = None, str(node.get(NAME_KEY, f"node-{context.node_id}"))
    # The institution's own folder (beside its ledger), or the simulation's output.
    cache = Path(policy.ledger_dir or cfg.federation.output_dir) / "token-cache"
    started = time.perf_counter()
    data, train_set, test_set, fingerprint, deidentify = prepared_data(
        cfg, partition, name, cache, stamp(cfg.data.data), policy.deidentify)
    prepared = time.perf_counter()
    if policy.dataset_id:  # the institution names its dataset: the ledger follows the name
        fingerprint = dataset_key(policy.dataset_id, [], [])
    model = load_model(cfg.model, federation_labels(cfg), cfg.train.seed)
    received = dict(request.arrays)
    run = int(request.config.get(RUN_KEY, context.run_id))
    check_model(cfg, int(request.config.get("server-round", 1)), evaluate, model, received,
                _journal_dir(cfg, policy, run, data.name) / "journal.jsonl")
    set_trainable_state(model, {k: torch.from_numpy(np.asarray(v)) for k, v in received.items()})
    device = resolve_device(cfg.model.device)
    loaded = time.perf_counter()
    net, (train_in, test_in) = features.prepare(model, [train_set, test_set], device, cache)
    timings = {"seconds-data": prepared - started, "seconds-model": loaded - prepared,
               "seconds-features": time.perf_counter() - loaded}
    return _Task(cfg, policy, data, fingerprint, train_in, test_in, model, net, device,
                 received, timings, run, deidentify, policy.released_count(len(train_in)))


def _ledger_dir(task: _Task) -> Path:
    """Where the dataset's ledger lives.

    A deployed institution keeps it in its own folder; a virtual institution of a
    simulation keeps one per run in the output folder.
    """
    return _journal_dir(task.cfg, task.policy, task.run, task.data.name)


def _journal_dir(cfg: FedsiloConfig, policy: Policy, run: int, name: str) -> Path:
    return Path(policy.ledger_dir) if policy.ledger_dir else (
        Path(cfg.federation.output_dir) / "ledgers" / f"run-{run}" / name)


def _release(task: _Task, request: Request) -> dict[str, np.ndarray]:
    """The arrays this round releases: clipped (client-level DP), as an update or not."""
    state = {k: v.numpy() for k, v in get_trainable_state(task.model).items()}
    if KEY_CLIPPING_NORM in request.config:  # client-level DP, clipped here
        trained = list(state.values())
        compute_clip_model_update(trained, [task.received[k] for k in state],
                                  float(request.config[KEY_CLIPPING_NORM]))
        state = dict(zip(state, trained, strict=True))
        log.info("%s: update clipped to L2 norm ≤ %s (client-level DP)", task.data.name,
                 request.config[KEY_CLIPPING_NORM])
    return released_arrays(request, state, task.received, task.cfg.federation.update_dtype)


def _train_private(task: _Task, request: Request) -> tuple[
    TrainResult, dict[str, float], dict[str, np.ndarray]
]:
    """Check the budget, train with DP-SGD, and record the spend before anything leaves."""
    cfg, n = task.cfg, task.released_count
    run, server_round = task.run, int(request.config["server-round"])
    ledger = budget.open_ledger(_ledger_dir(task), task.fingerprint, cfg.privacy.accountant,
                                task.policy)
    received = journal.digest(task.received)["sha256"]
    if ledger.has(run, server_round):
        kept = replay.load(_ledger_dir(task), task.fingerprint, run, server_round, received,
                           request.secure_aggregation)
        if kept is None:
            raise privacy.DeclinedError(
                f"declined: round {server_round} of run {run} was already trained and its "
                "update is not kept for this global model and aggregation (SecAgg+ or not); "
                "an update is never released twice")
        log.info("%s: round %d of run %d was already trained and released; sending the same "
                 "update again (no new privacy spend)", task.data.name, server_round, run)
        m = kept.metrics
        return (TrainResult(float(m["train-loss"]), int(m["steps"])),
                {k: float(m[k]) for k in ("epsilon", "delta", "noise-multiplier",
                                          "sample-rate")}, kept.arrays)
    delta = task.policy.delta(cfg.privacy.target_delta, n)
    dp_plan = privacy.plan(
        num_examples=n, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs,
        num_rounds=cfg.federation.num_rounds, target_epsilon=cfg.privacy.target_epsilon,
        delta=delta, accountant=cfg.privacy.accountant,
        reserved=tuple(evaluation.reserve([], task.policy, cfg.federation.num_rounds)),
    )
    budget.admit(ledger, dp_plan, run, task.data.name)  # before any training step
    result = train_private(task.net, task.train_set, cfg, dp_plan, ledger.restore(),
                           task.device, _correction(task, request))
    # Charged before anything is derived from the trained model: a SecAgg+ range check
    # that fails after this handler (client.secagg) still tells the coordinator one bit
    # of it, and a retry of the round finds it spent (answered from the replay).
    ledger.record(run, server_round, result.steps, dp_plan.sample_rate,
                  dp_plan.noise_multiplier, delta)
    released = _release(task, request)
    epsilon = budget.report(ledger, dp_plan, run, task.data.name)  # this run's ε only
    dp_metrics = {"epsilon": epsilon, "delta": delta,
                  "noise-multiplier": dp_plan.noise_multiplier,
                  "sample-rate": dp_plan.sample_rate}
    replay.save(_ledger_dir(task), task.fingerprint, run, replay.Release(
        server_round, received, released,
        {**dp_metrics, "train-loss": result.loss, "steps": result.steps},
        request.secure_aggregation))
    return result, dp_metrics, released


def _train_without_record_dp(task: _Task, request: Request) -> tuple[
    TrainResult, dict[str, float], dict[str, np.ndarray]
]:
    """Plain local training: DP off, or client-level DP (noise added by the coordinator)."""
    if not task.cfg.privacy.dp:
        log.warning("%s: DP is OFF (--no-dp): this update has no privacy guarantee",
                    task.data.name)
    result = train_plain(task.net, task.train_set, task.cfg, task.device,
                         _correction(task, request))
    metrics = {"epsilon": math.inf, "delta": 0.0, "noise-multiplier": 0.0, "sample-rate": 0.0}
    return result, metrics, _release(task, request)


def _correction(task: _Task, request: Request) -> Correction | None:
    """The coordinator's drift correction (``--strategy scaffold``) by trainable parameter."""
    if not request.correction:
        return None
    unknown = sorted(set(request.correction) - set(task.received))
    if unknown:
        raise ValueError(f"the coordinator sent a correction for {unknown[:3]}, which this "
                         "model does not train; both sides must use the same trainable set")
    params = dict(task.model.named_parameters())
    return {params[k]: torch.from_numpy(np.asarray(v, dtype=np.float32))
            for k, v in request.correction.items()}


def _name(context: Context) -> str:
    node = context.node_config
    return str(node.get(NAME_KEY) or
               f"institution-{node.get('partition-id', context.node_id)}")


def _uniform_weight(cfg: FedsiloConfig) -> dict[str, float]:
    """Client-level DP averages uniformly; Flower's accountant checks the weights."""
    client_level = cfg.privacy.client_level
    return {UNIFORM_WEIGHT_KEY: 1.0} if client_level else {}


@generic_errors(ReceivedModelError)
def train(msg: Message, context: Context, origin: Origin) -> Message:
    """Train the received global tensors locally and reply with the update.

    A declined round (budget, duplicate, policy) is answered with an error whose
    reason starts with ``declined:``; the coordinator reports it apart from failures.
    ``origin.age`` is the time before the task started (in the runtime: pulling the
    inputs and checking the bundle; in a fresh process: its start-up and imports),
    reported as ``seconds-process``.
    """
    entered = time.perf_counter()
    request = read_request(msg)
    try:
        task = _setup(request, context, origin)
        set_up = time.perf_counter()
        evaluated = _evaluate_received(task, context, request)
        started = time.perf_counter()
        record_level = task.cfg.privacy.record_level
        result, dp_metrics, released = (_train_private if record_level
                                        else _train_without_record_dp)(task, request)
        trained = time.perf_counter()
    except privacy.DeclinedError as err:
        log.warning("%s: %s", _name(context), err)
        if "task" in locals():
            _journal(task, context, request, "declined", reason=str(err))
        return Message(Error(code=DECLINED_CODE, reason=f"{_name(context)}: {err}"),
                       reply_to=msg)
    n = task.released_count  # declared, else exact
    metrics = {"num-examples": n, **dp_metrics, "steps": result.steps,
               **_uniform_weight(task.cfg), **evaluated}
    if task.policy.evaluation == "exact":  # a simulation's: not DP, so never from a site
        metrics["train-loss"] = result.loss
    if task.cfg.privacy.keep_updates:
        keep_update(_ledger_dir(task), task.fingerprint, task.run,
                    int(request.config["server-round"]), released, n)
    # Where the round's time went here (bench/round_anatomy.py reads these).
    metrics |= {"seconds-setup": set_up - entered, "seconds-train": trained - started,
                **task.timings}
    if evaluated:
        metrics["seconds-local-eval"] = started - set_up
    if origin.age is not None:
        metrics["seconds-process"] = origin.age  # time before the task started
    reply = train_reply(msg, task.data.name, metrics, released)
    _journal(task, context, request, "train", sent=journal.digest(released),
             num_examples=n, steps=result.steps,
             epsilon=None if math.isinf(metrics["epsilon"]) else metrics["epsilon"],
             delta=metrics["delta"],
             correction=journal.digest(request.correction) if request.correction else None)
    log.info("%s: trained %d steps on %d examples, loss %.4f, ε %.3f, %d bytes out",
             task.data.name, result.steps, n, result.loss, metrics["epsilon"],
             sum(a.nbytes for a in released.values()))
    return reply


@generic_errors(ReceivedModelError)
def evaluate_local(msg: Message, context: Context, origin: Origin) -> Message:
    """Evaluate the received global tensors on the institution's held-out data.

    What leaves is :func:`_released_evaluation`'s: nothing (declined), noised counts, or
    a simulation's exact metrics.
    """
    request = read_request(msg)
    try:
        task = _setup(request, context, origin, evaluate=True)
        metrics = _released_evaluation(task, context, request,
                                       int(request.config.get("server-round", 0)))
    except privacy.DeclinedError as err:
        log.warning("%s: %s", _name(context), err)
        return Message(Error(code=DECLINED_CODE, reason=f"{_name(context)}: {err}"),
                       reply_to=msg)
    return evaluate_reply(msg, task.data.name, {**metrics, **_uniform_weight(task.cfg)})


def _released_evaluation(task: _Task, context: Context, request: Request,
                         model_round: int, event: str = "evaluate") -> dict[str, float]:
    """Evaluate and return what may leave (:func:`fedsilo.client.evaluation.released`).

    ``model_round`` is the round whose global model is evaluated: the ledger allows one
    release per model, so a fused evaluation (round r's train message evaluates round
    r − 1's model, journalled as ``evaluate-received``) and the final evaluate message
    (round R's model) never collide.
    """
    cfg = task.cfg
    metrics, fields = evaluation.released(
        task.policy, lambda: evaluate(task.net, task.test_set, task.device),
        lambda: budget.open_ledger(_ledger_dir(task), task.fingerprint,
                                   cfg.privacy.accountant, task.policy),
        task.run, model_round, cfg,
        task.policy.delta(cfg.privacy.target_delta,
                          task.released_count))
    _journal(task, context, request, event, model_round=model_round, **fields)
    return metrics


def _evaluate_received(task: _Task, context: Context, request: Request) -> dict[str, float]:
    """Fused evaluation: the received global model's metrics on the local test split.

    Only when the train message asks (``EVALUATE_RECEIVED_KEY``); the metrics travel in
    the train reply under ``RECEIVED_PREFIX``. Runs before training changes the model.
    """
    if not request.config.get(EVALUATE_RECEIVED_KEY):
        return {}
    try:
        released = _released_evaluation(task, context, request,
                                        int(request.config["server-round"]) - 1,
                                        event="evaluate-received")
    except privacy.DeclinedError as err:  # training goes on without it
        log.info("%s: %s", task.data.name, err)
        return {}
    return {RECEIVED_PREFIX + k: v for k, v in released.items()}


def _journal(task: _Task, context: Context, request: Request, event: str,
             **fields: object) -> None:
    """Append to the institution's journal beside its ledger: what came in, what left."""
    journal.append(_ledger_dir(task) / "journal.jsonl", event,
                   institution=task.data.name, run=task.run,
                   round=request.config.get("server-round"), dataset=task.fingerprint[:16],
                   received=journal.digest(task.received),
                   secure_aggregation=request.secure_aggregation,
                   deidentified=task.deidentify, **fields)
