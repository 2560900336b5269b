"""The fedsilo ServerApp: aggregate institutions' updates, evaluate, save the model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsilo.common import features, lengths
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.logs import configure_logging
from fedsilo.common.metrics import majority_rate
from fedsilo.common.model import (
    get_trainable_state,
    load_model,
    load_tokenizer,
    resolve_device,
    set_trainable_state,
)
from fedsilo.common.records import TextRecords, load_records
from fedsilo.common.splits import split_holdout
from fedsilo.common.task import EvalResult, encode, evaluate, federation_labels
from fedsilo.common.wire import named_arrays
from fedsilo.server import checkpoint
from fedsilo.server.outputs import save_model
from fedsilo.server.plots import write_artefacts
from fedsilo.server.report import RunReport
from fedsilo.server.report_html import class_figures, predictions, write_report
from fedsilo.server.rounds import run_rounds
from fedsilo.server.secagg import SecAggGrid
from fedsilo.server.strategy import build_strategy
from fedsilo.server.tracking import Tracker
from fedsilo.server.waiting import PatientGrid

log = logging.getLogger(__name__)

app = ServerApp()

#: Centralized evaluation of the global tensors after a round (None = no holdout).
Evaluator = Callable[[int, dict[str, np.ndarray]], EvalResult | None]


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
    tracker = Tracker(out, cfg.to_flat(), cfg.federation.mlflow)  # TensorBoard (+ MLflow)

    holdout = _holdout(cfg)
    eval_set, net, truncation = None, model, None
    if holdout is not None:
        truncation = lengths.summary(lengths.token_lengths(tokenizer, holdout.texts),
                                     cfg.model.max_length)
        log.info("max length %d tokens: %.1f%% of the coordinator's held-out texts are cut",
                 cfg.model.max_length, 100 * truncation["share"])
        lengths.warn_if_truncated(truncation["share"], cfg.model.max_length, "held-out texts")
        tokens = encode(tokenizer, holdout, labels, cfg.model.max_length)
        report.doc["holdout_majority_rate"] = majority_rate(tokens.tensors[2].numpy())
        # The frozen encoder runs over the holdout once, not every round (head-only runs).
        net, (eval_set,) = features.prepare(model, [tokens], device, None)

    def centralized(server_round: int, arrays: dict[str, np.ndarray]) -> EvalResult | None:
        if eval_set is None:
            return None
        set_trainable_state(model, {k: torch.from_numpy(np.asarray(v))
                                    for k, v in arrays.items()})
        return evaluate(net, eval_set, device)

    log.info("fedsilo run: %d rounds, %d labels, trainable=%s, DP %s, output %s",
             cfg.federation.num_rounds, labels.num_labels, cfg.model.trainable,
             _dp_summary(cfg), out)
    if not cfg.privacy.dp:
        log.warning("DP is OFF (--no-dp): institutions' updates carry no privacy guarantee")
    final = _run_rounds(grid, context, cfg, report, get_trainable_state(model), centralized,
                        tracker)
    if not any(r["institutions"] for r in report.doc["rounds"]):
        raise RuntimeError("no institution returned an update in any round; nothing to save "
                           "(see the failures in metrics.json)")
    set_trainable_state(model, {k: torch.from_numpy(np.asarray(v)) for k, v in final.items()})
    save_model(model, tokenizer, out / "model", cfg.model.max_length)
    report.complete()
    tracker.update(report.doc)
    tracker.close(completed=True)
    log.info("saved the global model to %s and metrics to %s", out / "model", report.path)
    try:
        write_artefacts(report.doc, out)
        classes = None if eval_set is None else class_figures(
            *predictions(net, eval_set, device), labels.names)  # coordinator-held data only
        write_report(report.doc, out, classes, truncation)
    except (OSError, ValueError) as err:  # the run is complete; the pictures are extras
        log.warning("could not write rounds.csv, plots and report.html to %s: %s", out, err)


def _dp_summary(cfg: FedsiloConfig) -> str:
    if not cfg.privacy.dp:
        return "OFF"
    level = "client-level" if cfg.privacy.dp_level == "client" else "record-level"
    return f"{level}, target ε={cfg.privacy.target_epsilon}"


def _run_rounds(grid: Grid, context: Context, cfg: FedsiloConfig, report: RunReport,
                initial: dict[str, torch.Tensor], centralized: Evaluator,
                tracker: Tracker) -> dict[str, np.ndarray]:
    """Run (or resume) all rounds, under SecAgg+ or not; return the final tensors."""
    fed = cfg.federation
    out = Path(fed.output_dir)
    strategy = build_strategy(cfg, report)
    first, run_key, arrays = 1, context.run_id, ArrayRecord(initial)
    if fed.resume:
        ckpt = checkpoint.load(out)
        checkpoint.check_settings(ckpt, cfg.to_flat(), out / checkpoint.FILE)
        strategy.restore_checkpoint_state(ckpt.strategy_state)
        report.resume(ckpt.metrics)
        first, run_key = ckpt.server_round + 1, ckpt.run_key
        arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in ckpt.arrays.items()})
        log.info("resuming run %d after round %d of %d from %s", run_key, ckpt.server_round,
                 fed.num_rounds, out / checkpoint.FILE)
    else:
        report.record_centralized_eval(0, centralized(0, named_arrays(arrays)))
        report.finish_round(0)

    def end_of_round(server_round: int, arrays: ArrayRecord) -> None:
        tensors = named_arrays(arrays)
        report.record_centralized_eval(server_round, centralized(server_round, tensors))
        report.finish_round(server_round)
        tracker.update(report.doc)
        checkpoint.save(out, checkpoint.Checkpoint(
            server_round, run_key, tensors, strategy.checkpoint_state(),
            cfg.to_flat(), report.doc))

    patient = PatientGrid(
        grid, fed.min_available, fed.join_timeout, min_replies=fed.min_train,
        straggler_timeout=fed.straggler_timeout,
        on_missing=lambda m: report.record_dropped(m.server_round, m.node_id,
                                                   m.message_type, m.reason),
        on_late=lambda m, now: report.record_late(m.server_round, m.node_id,
                                                  m.message_type, now, m.reason),
        on_progress=report.progress,  # fold each update on arrival (none under SecAgg+)
        on_train_reply=None if fed.secure_aggregation else getattr(strategy, "absorb", None))
    log.info("%d institution(s) connected", patient.wait_until_joined())
    # From now on a round needs only min-train of them.
    patient.minimum, patient.flag = fed.min_train, "--min-train"
    rounds_grid = SecAggGrid(patient, context, fed, strategy.absorb_unmasked  # type: ignore[attr-defined]
                             ) if fed.secure_aggregation else patient
    final = run_rounds(strategy, rounds_grid, arrays,  # type: ignore[arg-type]
                       first=first, last=fed.num_rounds, run_key=run_key,
                       timeout=fed.round_timeout, evaluate_every=fed.evaluate_every,
                       end_of_round=end_of_round, fused_evaluation=fed.fused_evaluation)
    return named_arrays(final)
