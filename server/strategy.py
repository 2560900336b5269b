"""Aggregation strategies that also report every institution's reply."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Strategy

from fedsilo.common.config import FedsiloConfig
from fedsilo.server.client_dp import build_client_level_strategy
from fedsilo.server.replies import ReportingMixin
from fedsilo.server.report import RunReport
from fedsilo.server.scaffold import ReportingScaffold


def _mean_train_loss(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of ``train-loss`` (ε and δ are per institution, not averaged)."""
    weights = [float(r["metrics"][weight_key]) for r in records]
    losses = [float(r["metrics"]["train-loss"]) for r in records]
    total = sum(weights)
    return MetricRecord({"train-loss": sum(w * x for w, x in zip(weights, losses, strict=True))
                         / total})


class ReportingFedAvg(ReportingMixin, FedAvg):
    """FedAvg weighted by examples, reporting each institution."""

    fold_updates = True


class ReportingFedAvgM(ReportingMixin, FedAvgM):
    """FedAvg with server momentum on the averaged update, reporting each institution."""

    fold_updates = True


class ReportingFedAdam(ReportingMixin, FedAdam):
    """FedAdam (server-side Adam on the averaged update), reporting each institution."""

    fold_updates = True


def build_strategy(cfg: FedsiloConfig, report: RunReport) -> Strategy:
    """Create the configured strategy (Message API; SecAgg+ runs in ``server.secagg``)."""
    fed = cfg.federation
    common: dict[str, object] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_train,
        "min_train_nodes": fed.min_train,
        "min_evaluate_nodes": fed.min_train,
        # fedsilo waits for min-available institutions before the first round
        # (server.waiting); a later round goes on with any min-train of them.
        "min_available_nodes": fed.min_train,
        "train_metrics_aggr_fn": _mean_train_loss,
    }
    if cfg.privacy.dp and cfg.privacy.dp_level == "client":
        return build_client_level_strategy(cfg, report, common)
    if fed.strategy == "scaffold":
        return ReportingScaffold(**common, server_learning_rate=1.0,
                                 server_momentum=fed.server_momentum, report=report,
                                 train=cfg.train, privacy=cfg.privacy)
    if fed.strategy == "fedavgm":
        return ReportingFedAvgM(**common, server_learning_rate=1.0,
                                server_momentum=fed.server_momentum, report=report,
                                train=cfg.train, privacy=cfg.privacy)
    if fed.strategy == "fedadam":
        return ReportingFedAdam(**common, eta=fed.server_learning_rate, report=report,
                                train=cfg.train, privacy=cfg.privacy)
    return ReportingFedAvg(**common, report=report, train=cfg.train,
                           privacy=cfg.privacy)
