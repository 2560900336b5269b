#!/usr/bin/env python3
"""Canary audit: an empirical lower bound on ε for a simulated fedsilo federation.

Random-word canaries with random labels are generated; each is inserted into the first
institution's training data with probability 1/2 (members), the rest are kept out.
The federation is trained with ``run_simulation.py`` (any flag not listed below is
passed through to it, e.g. ``--no-dp``, ``--target-epsilon 1``, ``--local-epochs 4``),
the final model scores every canary and the one-run membership test of Steinke, Nasr &
Jagielski (2023) turns the guesses into a lower bound on ε at confidence 1 - β
(see ``canary_audit``). Without DP the audit should detect the canaries; with
DP the lower bound must stay at or below the ε the institution's accountant claims.

Writes ``audit.json`` per run; ``--compare`` runs no DP, ε = 8 and ε = 1 with the same
data and canaries and also writes ``audit-results.json`` and ``audit-results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import canary_audit  # beside this script
import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedsilo.common.config import (
    DEFAULT_MODEL,
    KEYS,
    SECTIONS,
    ConfigError,
    DataConfig,
    FedsiloConfig,
    ModelConfig,
)
from fedsilo.common.config_flags import add_config_arguments, config_overrides
from fedsilo.common.logs import configure_logging
from fedsilo.common.model import ModelError, load_tokenizer, resolve_device
from fedsilo.common.records import DataError, icd10_label_names, load_records, train_test_split
from fedsilo.common.splits import simulated_institution

log = logging.getLogger("fedsilo.audit")

RUN_SIMULATION = Path(__file__).resolve().parent / "run_simulation.py"
COMPARE = (("no DP", ["--no-dp"]), ("ε = 8", ["--target-epsilon", "8"]),
           ("ε = 1", ["--target-epsilon", "1"]))
# Flags this script sets itself: passing them through would break the audit's data.
OWNED = {"data", "text-column", "label-column", "labels", "partition", "partition-column",
         "output-dir", "seed", "test-fraction", "holdout-fraction", "max-examples", "model",
         "eval-data"}
MIN_LABEL_ROWS = 5  # real site-0 rows a label needs to be drawn as a canary label
NO_DP_DELTA = 1e-5  # δ for the no-DP control: the largest default δ of a DP run


class AuditError(RuntimeError):
    """The training run failed or its data does not match the audit's design."""


def build_parser() -> argparse.ArgumentParser:
    """The audit's own flags; everything else goes to ``run_simulation.py``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="outputs/audit", help="folder for everything")
    p.add_argument("--canaries", type=int, default=200, help="canaries m (about half inserted)")
    p.add_argument("--canary-words", type=int, default=8, help="random words per canary")
    p.add_argument("--real-examples", type=int, default=1000,
                   help="real records sampled (class-balanced) and dealt to the institutions")
    p.add_argument("--institutions", type=int, default=2, help="institutions; canaries go "
                   "into the first one's data only")
    p.add_argument("--data", default="icd10", help="source of the real records")
    p.add_argument("--text-column", default="text", help="text column of --data")
    p.add_argument("--label-column", default="label", help="label column of --data")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model to fine-tune")
    p.add_argument("--seed", type=int, default=42, help="training seed (splits, init)")
    p.add_argument("--audit-seed", type=int, default=0,
                   help="seed of the real sample, the canaries and their membership coins")
    p.add_argument("--test-fraction", type=float, default=0.02, help="local test share (small, "
                   "so canaries cannot change how many rows of a label are held out)")
    p.add_argument("--eval-examples", type=int, default=500, help="real records, disjoint "
                   "from the training data, for the coordinator's held-out evaluation")
    p.add_argument("--beta", type=float, default=0.05, help="1 - confidence of the bound")
    p.add_argument("--compare", action="store_true",
                   help="run no DP, ε = 8 and ε = 1 and write one combined table")
    return p


def check_args(args: argparse.Namespace, extra: list[str]) -> None:
    """Validate the audit's flags and the pass-through flags before any work.

    Raises
    ------
    ConfigError
        Naming the offending flag.

    """
    for flag, ok, need in (("--canaries", args.canaries >= 4, "at least 4"),
                           ("--canary-words", 1 <= args.canary_words <= 16, "in [1, 16]"),
                           ("--real-examples", args.real_examples >= 20, "at least 20"),
                           ("--institutions", 1 <= args.institutions <= 50, "in [1, 50]"),
                           ("--beta", 0 < args.beta < 1, "in (0, 1)"),
                           ("--test-fraction", 0 < args.test_fraction < 1, "in (0, 1)"),
                           ("--eval-examples", args.eval_examples >= 1, "at least 1")):
        if not ok:
            raise ConfigError(f"{flag}: must be {need}")
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False, exit_on_error=False)
    parser.add_argument("--client-cpus", type=int)
    parser.add_argument("--client-gpus", type=float)
    parser.add_argument("--verbose", action="store_true")
    add_config_arguments(parser, list(SECTIONS), "simulation")
    try:
        parsed, unknown = parser.parse_known_args(extra)
    except argparse.ArgumentError as err:
        raise ConfigError(str(err)) from None
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown flag (neither the audit's nor "
                          "run_simulation.py's)")
    flat = config_overrides(parsed)
    owned = sorted(OWNED & set(flat))
    if owned:
        raise ConfigError(f"--{owned[0]}: is set by the audit itself; use the audit's own "
                          "flag if it has one (see --help)")
    per_run = sorted({"dp", "target-epsilon"} & set(flat))
    if args.compare and per_run:
        raise ConfigError(f"--{per_run[0]}: cannot be combined with --compare, which sets it "
                          "per run")
    FedsiloConfig.from_flat(flat, origin="pass-through flags")


# ----------------------------------------------------------------------- data
@dataclass(frozen=True)
class Design:
    """The audit's data: canaries, label map and site-0's fixed real training records."""

    canaries: canary_audit.Canaries
    labels: list[str]
    real_train: tuple[str, ...]
    real_test: tuple[str, ...]


def _write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _site0(data: DataConfig, seed: int, institutions: int) -> tuple[list[str], list[str]]:
    """site-0's training and test texts, derived with the simulation's own code."""
    part = simulated_institution(data, seed, 0, institutions)  # "site-0" sorts first
    if part.name != "site-0":
        raise AuditError(f"partition 0 is {part.name!r}, not site-0")
    return list(part.train.texts), list(part.test.texts)


def _test_count(n: int, fraction: float, seed: int) -> int:
    """How many of a label's ``n`` rows the local split holds out."""
    try:
        return len(train_test_split(np.zeros(n, dtype=np.int64), fraction, seed)[1])
    except ValueError:  # the split refuses an empty test part: none held out
        return 0


def _steady_rows(real: int, canaries: int, fraction: float, seed: int) -> int | None:
    """Most real rows (at most ``real``) whose held-out count no canary count can change."""
    for rows in range(real, 1, -1):
        if len({_test_count(n, fraction, seed) for n in range(rows, rows + canaries + 1)}) == 1:
            return rows
    return None


def build_dataset(args: argparse.Namespace, out: Path, data: DataConfig) -> Design:
    """Write the audit CSVs: real rows dealt to the sites, member canaries in site-0.

    Which of site-0's real records train is fixed before the membership coins are
    flipped, so that flipping one coin adds or removes exactly one training record.
    The simulation's local split depends only on each label's row count, so a few real
    rows of a canary label are dropped where needed until the split holds out the same
    number of that label's rows whatever the number of member canaries; the script then
    writes the fixed test records into the held-out positions and the fixed training
    records plus the member canaries into the training positions, and re-derives the
    split to check it.
    """
    source = load_records(args.data, args.text_column, args.label_column)
    labels = icd10_label_names() if args.data == "icd10" else sorted(set(source.labels))
    picked = [(source.texts[i], source.labels[i]) for i in canary_audit.balanced_sample(
        source.labels, args.real_examples + args.eval_examples, args.audit_seed)]
    order = np.random.default_rng(args.audit_seed + 1).permutation(len(picked))
    _write_csv(out / "eval-data.csv", [list(picked[i]) for i in order[:args.eval_examples]],
               ("text", "label"))
    groups: dict[tuple[int, str], list[str]] = {}
    for n, i in enumerate(order[args.eval_examples:]):
        groups.setdefault((n % args.institutions, picked[i][1]), []).append(picked[i][0])
    groups = {k: v for k, v in groups.items() if len(v) > 1}  # no singleton labels
    site0 = {y: texts for (site, y), texts in groups.items() if site == 0}
    eligible = [y for y in labels if len(site0.get(y, ())) >= MIN_LABEL_ROWS]
    vocab = canary_audit.canary_vocabulary(load_tokenizer(ModelConfig(model=args.model))
                                           .get_vocab())
    canaries = canary_audit.generate_canaries(args.canaries, eligible, vocab, args.audit_seed,
                                              args.canary_words, avoid=source.texts)
    for y in eligible:  # drop real rows until the canaries cannot shift the split
        kept = _steady_rows(len(site0[y]), canaries.labels.count(y), args.test_fraction,
                            args.seed)
        if kept is None:
            raise ConfigError(
                f"--test-fraction {args.test_fraction}: with {canaries.labels.count(y)} "
                f"canaries labelled {y!r}, the number of site-0 rows held out would depend "
                "on how many are members; use a smaller --test-fraction or fewer --canaries")
        site0[y] = groups[(0, y)] = site0[y][:kept]
    held = {y: _test_count(len(texts), args.test_fraction, args.seed)
            for y, texts in site0.items()}
    rows = [[t, y, f"site-{site}"] for (site, y), texts in groups.items() for t in texts]
    rows += [[t, y, "site-0"] for t, y, keep in
             zip(canaries.texts, canaries.labels, canaries.members, strict=True) if keep]
    probe = out / "positions.csv"  # the same labels and sites; texts are row numbers
    _write_csv(probe, [[f"row {i}", y, s] for i, (_, y, s) in enumerate(rows)],
               ("text", "label", "institution"))
    trains = {int(t.split()[1]) for t in _site0(data.model_copy(update={"data": str(probe)}),
                                                args.seed, args.institutions)[0]}
    probe.unlink()
    real_train: list[str] = []
    real_test: list[str] = []
    for y, texts in site0.items():
        spots = [i for i, row in enumerate(rows) if row[1] == y and row[2] == "site-0"]
        train_spots = [i for i in spots if i in trains]
        test_spots = [i for i in spots if i not in trains]
        if len(test_spots) != held[y]:
            raise AuditError(f"site-0 holds out {len(test_spots)} rows of {y!r}, expected "
                             f"{held[y]}; common/splits.py may have changed")
        filling = texts[held[y]:] + [rows[i][0] for i in spots[len(texts):]]  # + canaries
        for i, text in zip(train_spots + test_spots, filling + texts[:held[y]], strict=True):
            rows[i][0] = text
        real_train += texts[held[y]:]
        real_test += texts[:held[y]]
    path = out / "audit-data.csv"
    _write_csv(path, rows, ("text", "label", "institution"))
    design = Design(canaries, labels, tuple(sorted(real_train)), tuple(sorted(real_test)))
    check_design(design, data.model_copy(update={"data": str(path)}), args.seed,
                 args.institutions)
    (out / "canaries.json").write_text(json.dumps(
        {"seed": canaries.seed, "site": "site-0", "texts": canaries.texts,
         "labels": canaries.labels, "members": canaries.members,
         "site0_real_train": design.real_train}, indent=1), "utf-8")
    log.info("audit data: %d real records over %d sites (site-0 trains on %d of them), "
             "%d canaries (%d inserted into site-0), %d evaluation records -> %s",
             len(rows) - sum(canaries.members), args.institutions, len(real_train),
             len(canaries), sum(canaries.members), args.eval_examples, path)
    return design


def check_design(design: Design, data: DataConfig, seed: int, institutions: int) -> None:
    """Check that site-0 trains on exactly its fixed real records plus the member canaries.

    Raises
    ------
    AuditError
        If the simulation's split of ``data`` disagrees.

    """
    train, test = _site0(data, seed, institutions)
    expected = Counter(design.real_train) + Counter(design.canaries.member_texts)
    if Counter(train) != expected or Counter(test) != Counter(design.real_test):
        raise AuditError(f"{data.data}: site-0's split is not the audit's design (fixed real "
                         "records + member canaries); common/splits.py may have changed")


# ---------------------------------------------------------------------- a run
def _claimed(doc: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    spent: dict[str, dict[str, float | None]] = {}
    for entry in doc["rounds"]:
        spent |= {n: {"epsilon": s["epsilon"], "delta": s["delta"]}
                  for n, s in entry["institutions"].items()}
    return spent


def run_one(name: str, extra: list[str], args: argparse.Namespace, out: Path,
            design: Design) -> dict[str, Any]:
    """Train one federation on the audit data, score the canaries and audit them."""
    run_dir = out / name.replace(" ", "").replace("=", "-").replace("ε", "eps").lower()
    command = [sys.executable, str(RUN_SIMULATION), "--data", str(out / "audit-data.csv"),
               "--partition", "column", "--partition-column", "institution",
               "--institutions", str(args.institutions), "--labels", json.dumps(design.labels),
               "--model", args.model, "--seed", str(args.seed),
               "--test-fraction", str(args.test_fraction), "--holdout-fraction", "0",
               "--eval-data", str(out / "eval-data.csv"), "--max-examples", "0",
               "--output-dir", str(run_dir), *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s: training (log: %s)", name, run_dir / "simulation.log")
    started = time.monotonic()
    with (run_dir / "simulation.log").open("w", encoding="utf-8") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        tail = (run_dir / "simulation.log").read_text("utf-8").splitlines()[-15:]
        raise AuditError(f"{name}: run_simulation.py exited {done.returncode}:\n"
                         + "\n".join(tail))
    doc = json.loads((run_dir / "metrics.json").read_text("utf-8"))
    if doc["status"] != "completed":
        raise AuditError(f"{name}: {run_dir / 'metrics.json'} says {doc['status']!r}")
    cfg = FedsiloConfig.from_flat({k: v for k, v in doc["config"].items() if k in KEYS},
                                  origin=str(run_dir / "metrics.json"))  # keys it knows
    check_design(design, cfg.data, cfg.train.seed, args.institutions)  # what it trained on
    canaries, labels, members = design.canaries, design.labels, list(design.canaries.members)
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    if [model.config.id2label[i] for i in range(len(labels))] != labels:
        raise AuditError(f"{name}: the saved model's labels differ from the audit's")
    scores = canary_audit.score_canaries(
        model, AutoTokenizer.from_pretrained(run_dir / "model"), canaries.texts,
        [labels.index(y) for y in canaries.labels], cfg.model.max_length,
        resolve_device(cfg.model.device))
    claimed = _claimed(doc)
    site = claimed.get("site-0", {"epsilon": None, "delta": 0.0})
    delta = site["delta"] if site["epsilon"] is not None else NO_DP_DELTA
    result = canary_audit.audit(scores, members, args.beta, float(delta or 0.0))
    last = doc["rounds"][-1]
    held_out = last["centralized_eval"] or last["federated_eval"] or {}
    report = {
        "setting": name, **result.to_dict(), "auc": canary_audit.auc(scores, members),
        "claimed": claimed, "claimed_epsilon": site["epsilon"], "dp": cfg.privacy.dp,
        "held_out_accuracy": held_out.get("accuracy"),
        "held_out_examples": held_out.get("num_examples"),
        "site0_train_records": len(design.real_train) + sum(members),
        "holdout_majority_rate": doc["holdout_majority_rate"], "wall_seconds": round(wall, 1),
        "scores": {"members": scores[np.array(members)].tolist(),
                   "non_members": scores[~np.array(members)].tolist()},
        "config": doc["config"], "command": shlex.join(command),
    }
    (run_dir / "audit.json").write_text(json.dumps(report, indent=1), "utf-8")
    claim = "no DP" if site["epsilon"] is None else f"claimed ε = {site['epsilon']:.3f}"
    log.info("%s: ε lower bound %.3f (%d/%d correct guesses, AUC %.3f) vs %s; held-out "
             "accuracy %s; %.0f s", name, result.epsilon_lower_bound, result.correct,
             result.guesses, report["auc"], claim, held_out.get("accuracy"), wall)
    return report


def markdown(reports: list[dict[str, Any]], beta: float) -> str:
    """Render the combined table."""
    lines = [f"| setting | claimed ε (site-0) | δ | ε lower bound ({100 * (1 - beta):.0f}%) "
             "| correct / guesses | AUC | held-out accuracy | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        claim = "— (no DP)" if r["claimed_epsilon"] is None else f"{r['claimed_epsilon']:.2f}"
        acc = "—" if r["held_out_accuracy"] is None else f"{r['held_out_accuracy']:.3f}"
        lines.append(f"| {r['setting']} | {claim} | {r['delta']:.2g} | "
                     f"{r['epsilon_lower_bound']:.2f} | {r['correct']}/{r['guesses']} | "
                     f"{r['auc']:.3f} | {acc} | {r['wall_seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Build the audit data, run the federation(s) and audit; return the exit code."""
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    out = Path(args.output_dir).expanduser().resolve()
    try:
        check_args(args, extra)
        out.mkdir(parents=True, exist_ok=True)
        split = DataConfig(partition="column", partition_column="institution",
                           test_fraction=args.test_fraction, holdout_fraction=0,
                           max_examples=0)
        design = build_dataset(args, out, split)
    except (ConfigError, DataError, ModelError, ValueError) as err:
        log.error("%s", err)
        return 2
    except AuditError as err:
        log.error("%s", err)
        return 1
    settings = COMPARE if args.compare else (("audit", []),)
    reports = []
    try:
        for name, flags in settings:
            reports.append(run_one(name, [*flags, *extra], args, out, design))
    except AuditError as err:
        log.error("%s", err)
        return 1
    if args.compare:
        combined = {"command": "python simulations/audit_canaries.py " + shlex.join(argv),
                    "beta": args.beta, "canaries": args.canaries,
                    "members": sum(design.canaries.members), "runs": reports}
        (out / "audit-results.json").write_text(json.dumps(combined, indent=1), "utf-8")
        (out / "audit-results.md").write_text(markdown(reports, args.beta), "utf-8")
        log.info("combined results: %s", out / "audit-results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
