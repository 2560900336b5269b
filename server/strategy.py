"""Aggregation strategies that also report every institution's reply."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)

from fedsilo.common.config import FedsiloConfig
from fedsilo.server.client_dp import build_client_level_strategy
from fedsilo.server.gate import Gate, load_roster
from fedsilo.server.report import RunReport
from fedsilo.server.scaffold import ReportingScaffold
from fedsilo.server.strategy_base import ReportingMixin


def _mean_train_loss(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of ``train-loss`` where given (ε, δ are per institution).

    Institutions may not release their training loss; without any, the record is empty.
    """
    pairs = [(float(r["metrics"][weight_key]), float(r["metrics"]["train-loss"]))
             for r in records if "train-loss" in r["metrics"]]
    total = sum(w for w, _ in pairs)
    return MetricRecord({"train-loss": sum(w * x for w, x in pairs) / total} if total else {})


class ReportingFedAvg(ReportingMixin, FedAvg):
    """FedAvg weighted by examples, reporting each institution."""

    fold_updates = True


class ReportingFedAvgM(ReportingMixin, FedAvgM):
    """FedAvg with server momentum on the averaged update, reporting each institution."""

    fold_updates = True
    state_attributes = {"momentum_vector": list}


class ReportingFedAdam(ReportingMixin, FedAdam):
    """FedAdam (server-side Adam on the averaged update), reporting each institution."""

    fold_updates = True
    state_attributes = {"m_t": dict, "v_t": dict}


class ReportingMedian(ReportingMixin, FedMedian):
    """Coordinate-wise median of the accepted models (Flower's FedMedian), unweighted.

    An order statistic needs every update at once: the coordinator holds one update
    per institution until the round is aggregated (no streaming sum).
    """


class ReportingTrimmedMean(ReportingMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Flower's FedTrimmedAvg), unweighted; holds every update."""


def build_strategy(cfg: FedsiloConfig, report: RunReport) -> Strategy:
    """Create the configured strategy (under SecAgg+, FedAvg on the unmasked sums)."""
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
    # Every reply passes the gate: names from the roster flower-server wrote, weights
    # clamped to the allow-list's expected examples (else --max-examples).
    mine: dict[str, object] = {"report": report, "train": cfg.train, "privacy": cfg.privacy,
                               "gate": Gate(load_roster(), cfg.data.max_examples),
                               "secure_aggregation": fed.secure_aggregation}
    if cfg.privacy.client_level:
        return build_client_level_strategy(cfg, common, mine)
    if fed.strategy == "scaffold":
        return ReportingScaffold(**common, server_learning_rate=1.0,
                                 server_momentum=fed.server_momentum, **mine)
    if fed.strategy == "fedavgm":
        return ReportingFedAvgM(**common, server_learning_rate=1.0,
                                server_momentum=fed.server_momentum, **mine)
    if fed.strategy == "fedadam":
        return ReportingFedAdam(**common, eta=fed.server_learning_rate, **mine)
    if fed.strategy == "median":
        return ReportingMedian(**common, **mine)
    if fed.strategy == "trimmed-mean":
        return ReportingTrimmedMean(**common, beta=fed.trim_fraction, **mine)
    return ReportingFedAvg(**common, **mine)
