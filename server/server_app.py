"""The fedsilo ServerApp: aggregate institutions' updates, evaluate, save the model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedsilo.common.config import FedsiloConfig
from fedsilo.common.data import TextRecords, load_records
from fedsilo.common.datasets import split_holdout
from fedsilo.common.logs import configure_logging
from fedsilo.common.metrics import majority_rate
from fedsilo.common.model import (
    get_trainable_state,
    load_model,
    load_tokenizer,
    resolve_device,
    set_trainable_state,
)
from fedsilo.common.task import EvalResult, encode, evaluate, federation_labels
from fedsilo.server.outputs import save_model
from fedsilo.server.plots import write_artefacts
from fedsilo.server.report import RunReport
from fedsilo.server.secagg import Evaluator, SecAggFedAvg, run_secagg
from fedsilo.server.strategy import build_strategy
from fedsilo.server.waiting import PatientGrid

log = logging.getLogger(__name__)

app = ServerApp()


def _holdout(cfg: FedsiloConfig) -> TextRecords | None:
    """The coordinator's held-out records, or None when it has none."""
    if cfg.data.eval_data:
        return load_records(cfg.data.eval_data, cfg.data.text_column, cfg.data.label_column)
    if cfg.data.holdout_fraction > 0:
        return split_holdout(cfg.data, cfg.train.seed)[1]
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds and write the model and ``metrics.json``."""
    configure_logging()
    cfg = FedsiloConfig.from_flat(context.run_config, origin="run config")
    out = Path(cfg.federation.output_dir).expanduser().resolve()
    labels = federation_labels(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, labels, cfg.train.seed)
    device = resolve_device(cfg.model.device)
    report = RunReport(out, list(labels.names), cfg.to_flat(), cfg.federation.num_rounds)

    holdout = _holdout(cfg)
    eval_set = None
    if holdout is not None:
        eval_set = encode(tokenizer, holdout, labels, cfg.model.max_length)
        report.doc["holdout_majority_rate"] = majority_rate(eval_set.tensors[2].numpy())

    def centralized(server_round: int, arrays: dict[str, np.ndarray]) -> EvalResult | None:
        if eval_set is None:
            return None
        set_trainable_state(model, {k: torch.from_numpy(np.asarray(v))
                                    for k, v in arrays.items()})
        return evaluate(model.to(device), eval_set, device)

    log.info("fedsilo run: %d rounds, %d labels, trainable=%s, DP %s, output %s",
             cfg.federation.num_rounds, labels.num_labels, cfg.model.trainable,
             _dp_summary(cfg), out)
    if not cfg.privacy.dp:
        log.warning("DP is OFF (--no-dp): institutions' updates carry no privacy guarantee")
    initial = get_trainable_state(model)
    if cfg.federation.secure_aggregation:
        strategy = SecAggFedAvg(cfg.federation, list(initial),
                                [t.numpy() for t in initial.values()], report, centralized)
        final = run_secagg(grid, context, cfg.federation, strategy)
    else:
        final = _run_message_api(grid, cfg, report, initial, centralized)
    if not any(r["institutions"] for r in report.doc["rounds"]):
        raise RuntimeError("no institution returned an update in any round; nothing to save "
                           "(see the failures in metrics.json)")
    set_trainable_state(model, {k: torch.from_numpy(np.asarray(v)) for k, v in final.items()})
    save_model(model, tokenizer, out / "model")
    report.complete()
    log.info("saved the global model to %s and metrics to %s", out / "model", report.path)
    try:
        write_artefacts(report.doc, out)
    except (OSError, ValueError) as err:  # the run is complete; the pictures are extras
        log.warning("could not write rounds.csv and plots to %s: %s", out, err)


def _dp_summary(cfg: FedsiloConfig) -> str:
    if not cfg.privacy.dp:
        return "OFF"
    level = "client-level" if cfg.privacy.dp_level == "client" else "record-level"
    return f"{level}, target ε={cfg.privacy.target_epsilon}"


def _run_message_api(grid: Grid, cfg: FedsiloConfig, report: RunReport,
                     initial: dict[str, torch.Tensor], centralized: Evaluator,
                     ) -> dict[str, np.ndarray]:
    """Run all rounds with a Message-API strategy; return the final tensors by name."""

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        named = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
        result = centralized(server_round, named)
        report.record_centralized_eval(server_round, result)
        report.finish_round(server_round)
        if result is None:
            return None
        return MetricRecord({"loss": result.loss, "accuracy": result.accuracy,
                             "macro-f1": result.macro_f1})

    result = build_strategy(cfg, report).start(
        grid=PatientGrid(grid, cfg.federation.min_available,  # type: ignore[arg-type]
                         cfg.federation.join_timeout),
        initial_arrays=ArrayRecord(initial),
        num_rounds=cfg.federation.num_rounds,
        timeout=cfg.federation.round_timeout,
        evaluate_fn=end_of_round,
    )
    arrays = result.arrays
    return dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
