"""``report.html``: one self-contained page a person reads after a run.

It shows the run's settings and agreement, held-out accuracy and loss per round, each
institution's cumulative ε per round against the agreed target, the final model's
per-class figures and confusion matrix, the share of texts cut at ``max-length``, and
who dropped out, declined or was rejected. Images are embedded (``data:`` URIs), so
the page needs no network and no other file.

Per-class figures and the confusion matrix come only from data the coordinator holds
(the simulation's holdout or ``--eval-data``), never from institutions' local data:
that would be a new release about their records.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.common.atomic import atomic_file
from fedsilo.common.features import logits

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

FILE = "report.html"
STYLE = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
         "padding:.2em .5em;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}"
         ".over{color:#b00;font-weight:bold}img{max-width:100%}.note{color:#666}")


def predictions(net: torch.nn.Module, dataset: TensorDataset,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Gold labels and the model's predictions on ``dataset`` (the coordinator's own data)."""
    net.eval()
    golds, preds = [], []
    for *inputs, y in DataLoader(dataset, batch_size=256):
        with torch.inference_mode():
            preds.append(logits(net, *(x.to(device) for x in inputs)).argmax(-1).cpu().numpy())
        golds.append(y.numpy())
    return np.concatenate(golds), np.concatenate(preds)


def class_figures(y_true: np.ndarray, y_pred: np.ndarray,
                  labels: Sequence[str]) -> dict[str, Any]:
    """Confusion matrix (rows: true label) and per-class precision, recall (accuracy), F1."""
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (np.asarray(y_true), np.asarray(y_pred)), 1)
    rows = []
    for i, name in enumerate(labels):
        hit, support, predicted = confusion[i, i], confusion[i].sum(), confusion[:, i].sum()
        precision = hit / predicted if predicted else 0.0
        recall = hit / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"label": name, "support": int(support), "precision": float(precision),
                     "recall": float(recall), "f1": float(f1)})
    return {"labels": list(labels), "confusion": confusion.tolist(), "per_class": rows}


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,' \
           f'{base64.b64encode(png).decode()}">'


def _file_img(path: Path, alt: str) -> str:
    return _img(path.read_bytes(), alt) if path.is_file() else ""


def _confusion_png(classes: Mapping[str, Any]) -> bytes:
    matrix, names = np.array(classes["confusion"]), classes["labels"]
    size = 2 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted",
           ylabel="true", title="confusion matrix (coordinator's held-out data)")
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize="small")
    ax.set_yticklabels(names, fontsize="small")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize="x-small",
                color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<th{' class=l' if i == 0 else ''}>{html.escape(h)}</th>"
                    for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(
        f"<td{' class=l' if i == 0 else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _num(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _rounds(doc: Mapping[str, Any]) -> str:
    rows = []
    for r in doc["rounds"]:
        held = r.get("centralized_eval") or r.get("federated_eval") or {}
        rows.append([r["round"], _num(held.get("accuracy")), _num(held.get("macro_f1")),
                     _num(held.get("loss"), 4), _num(r.get("train_loss"), 4),
                     len(r.get("institutions", {})), _num(r.get("seconds"), 1)])
    return _table(["round", "accuracy", "macro-F1", "held-out loss", "train loss",
                   "aggregated", "seconds"], rows)


def _epsilon(doc: Mapping[str, Any]) -> str:
    names = sorted({n for r in doc["rounds"] for n in r.get("institutions", {})})
    target = doc["config"].get("target-epsilon")
    rows = []
    for r in [r for r in doc["rounds"] if r["round"] > 0]:
        cells = [r["round"]]
        for name in names:
            eps = r.get("institutions", {}).get(name, {}).get("epsilon")
            over = eps is not None and target is not None and eps > float(target) + 1e-9
            cells.append("" if eps is None else
                         f"<span class={'over' if over else 'ok'}>{eps:.3f}</span>")
        rows.append(cells)
    note = f"<p>agreed target ε = {html.escape(str(target))} per institution for the run.</p>"
    return note + _table(["round", *names], rows)


def _people(doc: Mapping[str, Any]) -> str:
    rows = [[html.escape(kind), r["round"], html.escape(text)]
            for r in doc["rounds"] for key, kind in (("dropped", "dropped"),
                                                     ("declined", "declined"),
                                                     ("failures", "rejected / failed"))
            for text in r.get(key, [])]
    if not rows:
        return "<p>Every sampled institution was aggregated in every round.</p>"
    return _table(["what", "round", "who and why"], rows)


def _classes(classes: Mapping[str, Any] | None) -> str:
    if not classes:
        return ("<p class=note>No coordinator-held evaluation data (give --eval-data): no "
                "per-class figures. Institutions' local data is never used for them.</p>")
    rows = [[html.escape(c["label"]), c["support"], _num(c["recall"]), _num(c["precision"]),
             _num(c["f1"])] for c in classes["per_class"]]
    return (_table(["label", "examples", "accuracy (recall)", "precision", "F1"], rows)
            + _img(_confusion_png(classes), "confusion matrix"))


def render(doc: Mapping[str, Any], out: Path, classes: Mapping[str, Any] | None = None,
           truncation: Mapping[str, Any] | None = None) -> str:
    """The page for the run in ``doc`` (``metrics.json``) whose plots are in ``out``."""
    cfg = doc["config"]
    cut = ("<p class=note>not measured (no coordinator-held texts)</p>" if not truncation else
           f"<p>{truncation['share']:.1%} of the coordinator's held-out texts are longer than "
           f"max-length {truncation['max_length']} tokens and were cut (median "
           f"{truncation['median']} tokens).</p>")
    settings = _table(["setting", "value"], [[html.escape(k), html.escape(str(v))]
                                              for k, v in sorted(cfg.items())])
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>fedsilo run report"
        f"</title><style>{STYLE}</style></head><body><h1>fedsilo run report</h1>"
        f"<p>status <b>{html.escape(str(doc.get('status')))}</b> · agreement "
        f"<b>{html.escape(str(cfg.get('agreement-id') or 'none'))}</b> · written "
        f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}</p>"
        f"<h2>Accuracy and loss per round</h2>{_file_img(out / 'accuracy_loss.png', 'accuracy')}"
        f"{_rounds(doc)}<h2>Privacy: ε per institution per round</h2>"
        f"{_file_img(out / 'epsilon.png', 'epsilon')}{_epsilon(doc)}"
        f"<h2>Final model per class</h2><p class=note>From the coordinator's own held-out "
        f"data only (simulation holdout or --eval-data).</p>{_classes(classes)}"
        f"<h2>Truncation</h2>{cut}<h2>Dropped, declined, rejected</h2>{_people(doc)}"
        f"<h2>Settings</h2>{settings}</body></html>")


def write_report(doc: Mapping[str, Any], out: Path, classes: Mapping[str, Any] | None = None,
                 truncation: Mapping[str, Any] | None = None) -> Path:
    """Write ``out/report.html`` atomically; return its path."""
    path = out / FILE
    with atomic_file(path) as f:
        f.write(render(doc, out, classes, truncation).encode("utf-8"))
    log.info("wrote %s", path)
    return path
