#!/usr/bin/env python3
"""Hostile-coordinator canary audit: crafted models and unlimited evaluate requests.

The canary audit of ``audit_canaries.py`` asks what the final model remembers. Here the
coordinator attacks one institution directly (issue 24): for every canary it sends an
evaluate request whose head is aimed at that canary (``W[y] = s·f/|f|²``,
``b[y] = −0.98·s``, every other row 0, with ``s`` chosen so the model lies *inside* the
received-model bound of :mod:`fedsilo.client.received`), so that local accuracy counts
the canary exactly when it is in the institution's test split. Each canary is put
into the institution's data with probability 1/2; the score of a canary is the number
of correct predictions the reply implies (accuracy × num-examples; a declined request
scores 0) and ``canary_audit`` turns the guesses into a lower bound on ε.

Three institution settings, each against the same data and canaries, through the
institution's own handler (``fedsilo.client.handlers.evaluate_local``):

- ``exact``: every request answered with exact metrics (what every institution did
  before issue 24, and what a simulation's virtual institutions still do);
- ``default``: a deployed institution's default (``release-evaluation`` unset);
- ``noised``: ``release-evaluation = true`` (noised counts, ledger, one per round).

Writes ``hostile-audit.json`` and ``hostile-audit.md`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import canary_audit  # beside this script
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsilo.client import handlers
from fedsilo.client.ledger import Ledger
from fedsilo.client.received import received_bound
from fedsilo.client.runtime_bundle import Origin
from fedsilo.common import features
from fedsilo.common.config import DEFAULT_MODEL, FedsiloConfig, ModelConfig
from fedsilo.common.logs import configure_logging
from fedsilo.common.model import get_trainable_state, load_model, load_tokenizer
from fedsilo.common.records import TextRecords, icd10_label_names, load_records
from fedsilo.common.task import encode, federation_labels

log = logging.getLogger("fedsilo.audit")

SETTINGS = {"exact": {}, "default": {"release-evaluation": False},
            "noised": {"release-evaluation": True}}


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/audit-hostile"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--real-examples", type=int, default=300)
    parser.add_argument("--canaries", type=int, default=80)
    parser.add_argument("--test-fraction", type=float, default=0.8)
    parser.add_argument("--num-rounds", type=int, default=3)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.05)
    return parser


def _data(args: argparse.Namespace, out: Path) -> tuple[FedsiloConfig, canary_audit.Canaries]:
    """Write the institution's data: real ICD-10 records plus the member canaries."""
    source = load_records("icd10")
    names = icd10_label_names()
    picked = canary_audit.balanced_sample(source.labels, args.real_examples, args.seed)
    vocab = canary_audit.canary_vocabulary(
        load_tokenizer(ModelConfig(model=args.model)).get_vocab())
    # Label 0 is what the crafted head predicts for every other record.
    canaries = canary_audit.generate_canaries(args.canaries, names[1:], vocab, args.seed,
                                              avoid=source.texts)
    rows = [[source.texts[i], source.labels[i]] for i in picked]
    rows += [[t, y] for t, y, m in zip(canaries.texts, canaries.labels, canaries.members,
                                       strict=True) if m]
    path = out / "institution.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    cfg = FedsiloConfig.from_flat({
        "model": args.model, "data": str(path), "labels": json.dumps(names),
        "test-fraction": args.test_fraction, "holdout-fraction": 0.0, "partition": "iid",
        "num-rounds": args.num_rounds, "target-epsilon": args.target_epsilon,
        "max-length": 32, "seed": args.seed, "evaluate-every": 1})
    return cfg, canaries


def _heads(cfg: FedsiloConfig, canaries: canary_audit.Canaries) -> list[dict[str, np.ndarray]]:
    """One crafted model per canary, inside the bound at the last agreed round."""
    labels = federation_labels(cfg)
    model = load_model(cfg.model, labels, cfg.train.seed)
    initial = {k: v.numpy() for k, v in get_trainable_state(model).items()}
    if set(initial) != {"classifier.weight", "classifier.bias"}:
        raise SystemExit("the hostile audit crafts the classification head of a "
                         "mean-pooling model (--trainable classifier)")
    largest = max(float(np.abs(v).max()) for v in initial.values())
    # An evaluate request of round 1 follows one aggregation: the smallest bound used.
    bound = received_bound(cfg, 1, largest)
    limit = 0.5 * (bound if bound is not None else 100.0)
    tokens = encode(load_tokenizer(cfg.model), _records(canaries), labels,
                    cfg.model.max_length)
    feats = features.extract(model, tokens, torch.device("cpu")).tensors[0].numpy()
    heads = []
    for f, y in zip(feats, canaries.labels, strict=True):
        scale = limit * min(1.0, float(np.linalg.norm(f)))  # every entry at most `limit`
        weight = np.zeros_like(initial["classifier.weight"])
        bias = np.zeros_like(initial["classifier.bias"])
        weight[labels.label2id[y]] = scale * f / float(f @ f)
        bias[labels.label2id[y]] = -0.98 * scale
        heads.append({"classifier.weight": weight, "classifier.bias": bias})
    log.info("crafted %d heads, entries up to %.3g (received-model bound %.3g)", len(heads),
             limit, bound or float("nan"))
    return heads


def _records(canaries: canary_audit.Canaries) -> TextRecords:
    return TextRecords(list(canaries.texts), list(canaries.labels), {}, "canaries")


def _ask(cfg: FedsiloConfig, node: dict, head: dict[str, np.ndarray], server_round: int
         ) -> float | None:
    """One evaluate request with ``head``: the correct predictions it implies (None: no answer)."""
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in head.items()}),
                              "config": ConfigRecord({"server-round": server_round})}),
                  dst_node_id=1, message_type="evaluate")
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                      run_config=cfg.to_flat())
    reply = handlers.evaluate_local(msg, context, Origin(None, None))
    if reply.has_error():
        return None
    m = reply.content["metrics"]
    return float(m["accuracy"]) * float(m["num-examples"])


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the three settings; return the report."""
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg, canaries = _data(args, out)
    heads = _heads(cfg, canaries)
    report: dict[str, object] = {"canaries": len(canaries), "members": sum(canaries.members),
                                 "beta": args.beta, "settings": {}}
    for name, extra in SETTINGS.items():
        run_cfg = cfg.replace(output_dir=str(out / name))
        node = {"partition-id": 0, "num-partitions": 1, **extra}
        replies = [_ask(run_cfg, node, head, 1 + i % args.num_rounds)
                   for i, head in enumerate(heads)]
        answered = sum(1 for s in replies if s is not None)
        scores = [0.0 if s is None else s for s in replies]  # no answer: no information
        result = canary_audit.audit(scores, canaries.members, beta=args.beta, delta=1e-5)
        ledgers = list((out / name / "ledgers").rglob("*.json"))
        spent = Ledger.open(ledgers[0].parent, json.loads(ledgers[0].read_text())[
            "fingerprint"], cfg.privacy.accountant).spent(1e-5) if ledgers else None
        report["settings"][name] = {  # type: ignore[index]
            "answered": answered, "requests": len(scores),
            "epsilon_lower_bound": result.epsilon_lower_bound,
            "correct": result.correct, "guesses": result.guesses,
            "auc": canary_audit.auc(scores, canaries.members),
            "epsilon_charged": spent, "claimed_epsilon": args.target_epsilon}
        log.info("%s: %d/%d requests answered, ε ≥ %.2f (%d/%d correct)", name, answered,
                 len(scores), result.epsilon_lower_bound, result.correct, result.guesses)
    (out / "hostile-audit.json").write_text(json.dumps(report, indent=1), "utf-8")
    lines = ["| institution setting | requests answered | ε lower bound (95%) | correct / "
             "guesses | AUC | ε charged to the ledger |", "|---|---|---|---|---|---|"]
    for name, r in report["settings"].items():  # type: ignore[union-attr]
        charged = "—" if r["epsilon_charged"] is None else f"{r['epsilon_charged']:.3f}"
        lines.append(f"| {name} | {r['answered']}/{r['requests']} | "
                     f"{r['epsilon_lower_bound']:.2f} | {r['correct']}/{r['guesses']} | "
                     f"{r['auc']:.3f} | {charged} |")
    (out / "hostile-audit.md").write_text("\n".join(lines) + "\n", "utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the audit and print its table."""
    configure_logging()
    args = build_parser().parse_args(argv)
    run(args)
    print((args.output_dir / "hostile-audit.md").read_text("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
