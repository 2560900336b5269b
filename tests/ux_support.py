"""A small metrics.json document and the optional-tool rule of the ux tests."""

import importlib
import os
import shutil

import pytest


def need(module: str):
    """Import ``module``, or skip the test; with CI=true a missing piece fails instead."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed (.ci/setup.sh installs it)")


def need_program(name: str) -> str:
    """The path of program ``name``, or skip; with CI=true a missing program fails."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            raise AssertionError(f"{name} is not installed (.ci/setup.sh installs it)")
        pytest.skip(f"{name} is not installed (.ci/setup.sh installs it)")
    return path


def run_doc() -> dict:
    """Two rounds, two institutions, a drop, a decline and a rejection."""
    def inst(eps, loss):
        return {"num_examples": 100, "train_loss": loss, "epsilon": eps, "delta": 1e-5}

    rounds = [{"round": 0, "train_loss": None, "institutions": {}, "client_level_dp": None,
               "centralized_eval": {"loss": 3.0, "accuracy": 0.1, "macro_f1": 0.05,
                                    "num_examples": 40},
               "federated_eval": None, "seconds": 1.0, "bytes_received": 0,
               "aggregate_seconds": None, "failures": [], "declined": [], "dropped": [],
               "late": []}]
    for r in (1, 2):
        rounds.append({
            "round": r, "train_loss": 2.0 / r, "seconds": 300.0 if r == 1 else 10.0,
            "bytes_received": 5000 * r, "aggregate_seconds": 0.5, "late": [],
            "institutions": {"hospital-a": inst(3.0 * r, 1.5 / r),
                             "hospital-b": inst(4.5 * r, 1.7 / r)},
            "client_level_dp": None,
            "centralized_eval": {"loss": 2.0 / r, "accuracy": 0.3 * r, "macro_f1": 0.2 * r,
                                 "num_examples": 40},
            "federated_eval": None,
            "failures": ["hospital-c (node 9): rejected: update holds NaN"] if r == 1 else [],
            "declined": ["hospital-d (node 4): declined: budget spent"] if r == 2 else [],
            "dropped": ["hospital-e (node 5): train reply missing: gone"] if r == 2 else []})
    return {"schema": 1, "labels": ["cardio", "resp", "neuro"], "status": "completed",
            "config": {"target-epsilon": 8.0, "dp": True, "num-rounds": 2, "max-length": 64,
                       "agreement-id": "agr-1234", "output-dir": "outputs/x"},
            "holdout_majority_rate": 0.34, "rounds": rounds}
