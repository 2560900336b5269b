"""The fedsilo ClientApp: one institution's DP-SGD training and local evaluation."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch.utils.data import TensorDataset
from transformers import PreTrainedModel

from fedsilo.client import privacy
from fedsilo.client.ledger import Ledger, dataset_fingerprint
from fedsilo.client.policy import NAME_KEY, Policy, institution_config
from fedsilo.client.train import TrainResult, train_plain, train_private
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.datasets import InstitutionData, local_institution, simulated_institution
from fedsilo.common.logs import configure_logging
from fedsilo.common.model import (
    get_trainable_state,
    load_model,
    load_tokenizer,
    resolve_device,
    set_trainable_state,
)
from fedsilo.common.task import encode, evaluate, federation_labels
from fedsilo.common.wire import DECLINED_CODE, INSTITUTION_KEY, array_record_bytes

log = logging.getLogger(__name__)

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _prepared(
    cfg: FedsiloConfig, partition: tuple[int, int] | None, name: str
) -> tuple[InstitutionData, TensorDataset, TensorDataset, str]:
    """Load, tokenise and fingerprint this institution's data once per process."""
    if partition is not None:
        data = simulated_institution(cfg.data, cfg.train.seed, *partition)
    else:
        data = local_institution(cfg.data, name, cfg.train.seed)
    labels = federation_labels(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_set = encode(tokenizer, data.train, labels, cfg.model.max_length)
    test_set = encode(tokenizer, data.test, labels, cfg.model.max_length)
    return data, train_set, test_set, dataset_fingerprint(data.train.texts, data.train.labels)


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
    device: torch.device


def _setup(msg: Message, context: Context) -> _Task:
    """Resolve settings, load this institution's data and the received global model."""
    configure_logging()
    cfg = FedsiloConfig.from_flat(context.run_config, origin="run config")
    node = context.node_config
    if "partition-id" in node:  # a virtual institution of a simulation
        partition = (int(node["partition-id"]), int(node["num-partitions"]))
        name, policy = "", Policy()
    else:  # a real institution: its node config holds its data and privacy policy
        cfg, policy = institution_config(cfg, node)
        partition, name = None, str(node.get(NAME_KEY, f"node-{context.node_id}"))
    data, train_set, test_set, fingerprint = _prepared(cfg, partition, name)
    model = load_model(cfg.model, federation_labels(cfg), cfg.train.seed)
    set_trainable_state(model, msg.content["arrays"].to_torch_state_dict())
    device = resolve_device(cfg.model.device)
    return _Task(cfg, policy, data, fingerprint, train_set, test_set, model.to(device), device)


def _reply(
    msg: Message, name: str, metrics: dict[str, float], arrays: ArrayRecord | None
) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord(metrics), INSTITUTION_KEY: ConfigRecord({"name": name})}
    )
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _ledger(task: _Task, run: int) -> Ledger:
    """Open the dataset's ledger.

    A deployed institution keeps it in its own folder; a virtual institution of a
    simulation keeps one per run in the output folder.
    """
    folder = Path(task.policy.ledger_dir) if task.policy.ledger_dir else (
        Path(task.cfg.federation.output_dir) / "ledgers" / f"run-{run}" / task.data.name)
    return Ledger.open(folder, task.fingerprint, task.cfg.privacy.accountant)


def _train_private(task: _Task, msg: Message, context: Context) -> tuple[TrainResult, dict]:
    """Check the budget, train with DP-SGD, and record the spend before replying."""
    cfg, n = task.cfg, len(task.train_set)
    run, server_round = context.run_id, int(msg.content["config"]["server-round"])
    ledger = _ledger(task, run)
    if ledger.has(run, server_round):
        raise privacy.DeclinedError(f"declined: round {server_round} of run {run} was already "
                                    "trained; an update is never released twice")
    delta = task.policy.delta(cfg.privacy.target_delta, n)
    dp_plan = privacy.plan(
        num_examples=n, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs,
        num_rounds=cfg.federation.num_rounds, target_epsilon=cfg.privacy.target_epsilon,
        delta=delta, accountant=cfg.privacy.accountant,
        prior=tuple(ledger.history(exclude_run=run)),
    )
    privacy.check_budget(ledger.restore(), dp_plan)  # before any training step
    result = train_private(task.model, task.train_set, cfg, dp_plan, ledger.restore(),
                           task.device)
    epsilon = ledger.record(run, server_round, result.steps, dp_plan.sample_rate,
                            dp_plan.noise_multiplier, delta)
    return result, {"epsilon": epsilon, "delta": delta,
                    "noise-multiplier": dp_plan.noise_multiplier,
                    "sample-rate": dp_plan.sample_rate}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global tensors locally and reply with the update.

    A declined round (budget, duplicate, policy) is answered with an error whose
    reason starts with ``declined:``; the coordinator reports it apart from failures.
    """
    try:
        task = _setup(msg, context)
        if task.cfg.privacy.dp:
            result, dp_metrics = _train_private(task, msg, context)
        else:
            log.warning("%s: DP is OFF (--no-dp): this update has no privacy guarantee",
                        task.data.name)
            result = train_plain(task.model, task.train_set, task.cfg, task.device)
            dp_metrics = {"epsilon": math.inf, "delta": 0.0, "noise-multiplier": 0.0,
                          "sample-rate": 0.0}
    except privacy.DeclinedError as err:
        node = context.node_config
        name = node.get(NAME_KEY) or f"institution-{node.get('partition-id', context.node_id)}"
        log.warning("%s: %s", name, err)
        return Message(Error(code=DECLINED_CODE, reason=f"{name}: {err}"), reply_to=msg)
    data, n = task.data, len(task.train_set)
    metrics = {"num-examples": n, **dp_metrics, "train-loss": result.loss,
               "steps": result.steps}
    arrays = ArrayRecord(get_trainable_state(task.model))
    log.info(
        "%s: trained %d steps on %d examples, loss %.4f, ε %.3f, %d bytes out",
        data.name, result.steps, n, result.loss, metrics["epsilon"], array_record_bytes(arrays),
    )
    return _reply(msg, data.name, metrics, arrays)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global tensors on the institution's held-out data."""
    task = _setup(msg, context)
    res = evaluate(task.model, task.test_set, task.device)
    metrics = {
        "num-examples": res.num_examples,
        "loss": res.loss,
        "accuracy": res.accuracy,
        "macro-f1": res.macro_f1,
    }
    return _reply(msg, task.data.name, metrics, None)
