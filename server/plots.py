"""End-of-run artefacts beside ``metrics.json``: a per-round CSV and PNG plots.

``rounds.csv`` has one row per round and institution (and one for the federation);
``accuracy_loss.png`` plots held-out accuracy, macro-F1 and losses per round;
``epsilon.png`` plots every institution's cumulative ε (and the client-level ε).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger(__name__)

CSV_FIELDS = ("round", "institution", "num_examples", "train_loss", "epsilon", "delta",
              "eval_accuracy", "eval_macro_f1", "eval_loss", "seconds")


def _csv_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for entry in doc["rounds"]:
        held_out = entry["centralized_eval"] or entry["federated_eval"] or {}
        rows.append({"round": entry["round"], "institution": "(federation)",
                     "train_loss": entry["train_loss"],
                     "epsilon": (entry.get("client_level_dp") or {}).get("epsilon"),
                     "eval_accuracy": held_out.get("accuracy"),
                     "eval_macro_f1": held_out.get("macro_f1"),
                     "eval_loss": held_out.get("loss"), "seconds": entry["seconds"]})
        for name, stats in sorted(entry["institutions"].items()):
            rows.append({"round": entry["round"], "institution": name,
                         **{k: stats.get(k) for k in ("num_examples", "train_loss",
                                                      "epsilon", "delta")}})
    return rows


def write_artefacts(doc: dict[str, Any], folder: Path) -> list[Path]:
    """Write ``rounds.csv``, ``accuracy_loss.png`` and ``epsilon.png``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "rounds.csv", folder / "accuracy_loss.png", folder / "epsilon.png"]
    with paths[0].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_csv_rows(doc))
    rounds = doc["rounds"]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("centralized_eval", "coordinator holdout"),
                       ("federated_eval", "institutions' local test")):
        for metric, ax, style, name in (("accuracy", acc_ax, "o-", "accuracy"),
                                        ("macro_f1", acc_ax, "s--", "macro-F1"),
                                        ("loss", loss_ax, "o-", "loss")):
            # a noised release carries accuracy and a count only
            points = [(r["round"], r[key][metric]) for r in rounds
                      if r[key] and r[key].get(metric) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{name} ({label})")
    trained = [(r["round"], r["train_loss"]) for r in rounds if r["train_loss"] is not None]
    if trained:
        loss_ax.plot(*zip(*trained, strict=True), "^-", label="training loss (mean)")
    if doc.get("holdout_majority_rate"):
        acc_ax.axhline(doc["holdout_majority_rate"], color="grey", ls=":",
                       label="majority class")
    acc_ax.set(xlabel="round", ylabel="score", title="held-out accuracy", ylim=(0, 1))
    loss_ax.set(xlabel="round", ylabel="cross-entropy", title="loss")
    for ax in (acc_ax, loss_ax):
        if ax.get_legend_handles_labels()[0]:  # a deployed run may release no loss at all
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({n for r in rounds for n in r["institutions"]})
    for name in names:
        points = [(0, 0.0)] + [
            (r["round"], r["institutions"][name]["epsilon"]) for r in rounds
            if name in r["institutions"] and r["institutions"][name]["epsilon"] is not None]
        if len(points) > 1:
            ax.plot(*zip(*points, strict=True), "o-", label=name)
    client_level = [(r["round"], r["client_level_dp"]["epsilon"]) for r in rounds
                    if r.get("client_level_dp")]
    if client_level:
        ax.plot(*zip(*client_level, strict=True), "k^-", label="client-level (coordinator)")
    target = doc["config"].get("target-epsilon")
    if target and doc["config"].get("dp", True):
        ax.axhline(target, color="red", ls=":", label=f"target ε = {target}")
    ax.set(xlabel="round", ylabel="cumulative ε", title="privacy spent")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths
