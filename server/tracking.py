"""Experiment tracking at the coordinator: TensorBoard always, MLflow when asked.

Every finished round's metrics (held-out accuracy, loss and macro-F1, training loss),
each institution's cumulative ε and the system figures (round time, bytes received,
replies aggregated, failed, declined, dropped) go to TensorBoard event files in
``<output-dir>/tensorboard`` (``tensorboard --logdir <output-dir>``), written with
tensorboard's own writer. With ``--mlflow local`` (a folder store in
``<output-dir>/mlruns``) or ``--mlflow URI`` the same figures and the run's settings
go to MLflow too. Only the coordinator writes; institutions need no tracker access.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
EXPERIMENT = "fedsilo"
_METRIC_NAME = re.compile(r"[^\w\-. /]")


class TrackingError(RuntimeError):
    """MLflow was asked for but cannot be used; the message says how to fix it."""


def mlflow_uri(target: str, out: Path) -> str:
    """The tracking URI ``--mlflow`` names (``local``: a folder store in ``out``)."""
    return (out / MLFLOW_DIR).resolve().as_uri() if target == "local" else target


def check_mlflow(target: str) -> None:
    """Fail before the run when ``--mlflow`` is given and mlflow is not installed."""
    if not target:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TrackingError(f"--mlflow {target}: mlflow is not installed; install the "
                            "optional extra (pip install 'fedsilo[tracking]') or leave out "
                            "--mlflow (TensorBoard files are written either way)") from None


def round_scalars(entry: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The (tag, value) pairs one round of ``metrics.json`` holds (finite values only)."""
    for group, key in (("eval", "centralized_eval"), ("federated_eval", "federated_eval")):
        for name, value in (entry.get(key) or {}).items():
            if name != "num_examples":
                yield f"{group}/{name}", value
    yield "train/loss", entry.get("train_loss")
    for name, stats in sorted(entry.get("institutions", {}).items()):
        yield f"epsilon/{name}", stats.get("epsilon")
        yield f"train_loss/{name}", stats.get("train_loss")
    if entry.get("client_level_dp"):
        yield "epsilon/client-level", entry["client_level_dp"].get("epsilon")
    yield "system/round_seconds", entry.get("seconds")
    yield "system/aggregate_seconds", entry.get("aggregate_seconds")
    yield "system/bytes_received", entry.get("bytes_received")
    yield "system/institutions_aggregated", len(entry.get("institutions", {}))
    for key in ("failures", "declined", "dropped", "late"):
        yield f"system/{key}", len(entry.get(key, []))


class Tracker:
    """Writes each round's figures once, as :meth:`update` sees them appear."""

    def __init__(self, out: Path, settings: Mapping[str, Any], mlflow: str = "") -> None:
        self.folder = out / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.folder))
        self._writer.add_text("settings", "\n".join(
            f"    {k} = {v}" for k, v in sorted(settings.items())), 0)
        self._seen: set[tuple[int, str]] = set()
        self._client, self._run_id = None, ""
        if mlflow:
            self._start_mlflow(mlflow_uri(mlflow, out), settings)

    def _start_mlflow(self, uri: str, settings: Mapping[str, Any]) -> None:
        check_mlflow(uri)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # folder store: maintained
        from mlflow.tracking import MlflowClient  # the optional extra, imported when asked

        self._client = MlflowClient(tracking_uri=uri)
        found = self._client.get_experiment_by_name(EXPERIMENT)
        experiment = found.experiment_id if found else self._client.create_experiment(EXPERIMENT)
        run = self._client.create_run(experiment, run_name=Path(str(
            settings.get("output-dir", "fedsilo"))).name, tags={
            "agreement-id": str(settings.get("agreement-id") or "none")})
        self._run_id = run.info.run_id
        for key, value in sorted(settings.items()):
            self._client.log_param(self._run_id, key, str(value)[:500])
        log.info("MLflow: run %s in experiment %r at %s", self._run_id, EXPERIMENT, uri)

    def update(self, doc: Mapping[str, Any]) -> None:
        """Write every figure of ``doc`` (``metrics.json``) not written before."""
        for entry in doc.get("rounds", []):
            step = int(entry["round"])
            for tag, value in round_scalars(entry):
                if (step, tag) in self._seen or not isinstance(value, int | float) \
                        or not math.isfinite(value):
                    continue
                self._seen.add((step, tag))
                self._writer.add_scalar(tag, float(value), step)
                if self._client is not None:
                    self._client.log_metric(self._run_id, _METRIC_NAME.sub("_", tag),
                                            float(value), step=step)
        self._writer.flush()

    def close(self, completed: bool) -> None:
        """Flush and close the event file; end the MLflow run as finished or failed."""
        self._writer.close()
        if self._client is not None:
            self._client.set_terminated(self._run_id, "FINISHED" if completed else "FAILED")
