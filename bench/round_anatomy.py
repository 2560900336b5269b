#!/usr/bin/env python3
"""Round anatomy of a real deployment on loopback: where a round's wall time goes.

Provisions a PKI, starts ``flower-server`` (TLS, node authentication, DP) and two
``flower-client``s on 127.0.0.1 and runs the README demo's round: the two
institutions hold the shares of the demo's institutions 0 and 1 (Dirichlet(α = 0.5)
over ICD-10; each keeps 10 % for local evaluation and trains on at most 6,000
examples, as in the demo), the coordinator evaluates on the demo's holdout (1,819
codes), rounds and local epochs are the demo's, and every other setting is the
default (head only, 24 tokens, ε = 8 over the run). Every round's wall time (from
``metrics.json``, placed in time by the audit journals) is split into the train
message (the slower institution's ClientApp process start-up and imports, data
preparation, model load, encoder features, local evaluation of the received model
(fused evaluation, the default) and training, plus transfer and Flower's
scheduling), the coordinator's aggregation, the
evaluate message (a ClientApp process, local evaluation; with fused evaluation only
after the last round) and the coordinator's remainder (centralized evaluation,
metrics, checkpoint). "Overhead" is everything but training.

The deployment runs twice in one go, each from fresh kits and caches: with fused
evaluation (the default: one message per round) and with ``flower-server
--no-fused-evaluation`` (an evaluate message after every round, Flower's way); in
both, every message runs in fedsilo's runtime, one long-lived process per
institution. Round 1 computes the frozen
encoder's features once per dataset; rounds 2+ are the steady state a longer run
repeats.

    .venv/bin/python bench/round_anatomy.py   # writes bench/results/round_anatomy.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import markdown, simulation, write, write_csv

from fedsilo.common.config import DataConfig
from fedsilo.common.partition import partition_dirichlet
from fedsilo.common.processes import BIN, child_env, free_port, stop_group
from fedsilo.common.splits import split_holdout, take
from fedsilo.server.provision import provision

PARTS = ("process", "data", "model", "features", "local-eval", "train")
COLUMNS = (*PARTS, "transfer", "aggregation", "evaluate", "coordinator")
#: The acceptance target: everything but training is at most this share of a round.
TARGET_OVERHEAD = 0.10
Timeline = dict[tuple[str, int], float]
NAMES = ("hospital-a", "hospital-b")
#: fused evaluation (the default); an evaluate message after every round
MODES = ("warm", "separate-eval")
SEED = 42  # the demo's --seed
DEMO_INSTITUTIONS = 3  # the demo splits ICD-10 three ways; these are its first two shares


def _datasets(root: Path) -> tuple[dict[str, Path], Path]:
    """The demo's institutions 0 and 1 (whole shares) and its holdout, as CSV files."""
    cfg = DataConfig()  # the demo's data settings: ICD-10, Dirichlet α = 0.5, 5 % holdout
    pool, holdout = split_holdout(cfg, SEED)
    assert holdout is not None
    labels = np.unique(np.asarray(pool.labels), return_inverse=True)[1]
    parts = partition_dirichlet(labels, DEMO_INSTITUTIONS, cfg.dirichlet_alpha, SEED)
    paths = {name: root / f"{name}.csv" for name in NAMES}
    for j, name in enumerate(NAMES):
        write_csv(paths[name], take(pool, parts[j]))
    write_csv(root / "holdout.csv", holdout)
    return paths, root / "holdout.csv"


def run_deployment(root: Path, args: argparse.Namespace,
                   mode: str) -> tuple[dict[str, Any], Timeline]:
    """Run the federation in one of :data:`MODES`; return ``metrics.json`` and timestamps."""
    port = free_port()
    pki = provision(root / "pki", ["localhost"], list(NAMES), port=port, generate_keys=True)
    data, holdout = _datasets(root)
    run_flags = ["--num-rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
                 "--strategy", args.strategy,
                 *(["--no-fused-evaluation"] if mode == "separate-eval" else [])]
    agreement = root / "agreement.json"  # deployed institutions run only under one
    subprocess.run([str(BIN / "flower-server"), "agreement", "--pki", str(root / "pki"),
                    "--name", "bench", "--out", str(agreement), *run_flags], check=True)
    for n in NAMES:
        subprocess.run([str(BIN / "flower-client"), "approve", str(agreement), "--config",
                        str(pki.kits[n] / "client.toml"), "--yes"], check=True,
                       stdin=subprocess.DEVNULL)
    env = child_env(OMP_NUM_THREADS=str(args.threads))
    # The demo's coordinator (flwr-simulation) runs with torch's default thread count.
    server_env = child_env(**({"OMP_NUM_THREADS": str(args.server_threads)}
                              if args.server_threads else {}))
    out = root / "out"
    server_cmd = [str(BIN / "flower-server"), "--pki", str(root / "pki"), "--state-dir",
                  str(root / "state"), "--host", "127.0.0.1", "--port", str(port),
                  *run_flags, "--agreement", str(agreement),
                  "--min-available", "2", "--min-train", "2",
                  "--max-examples", str(args.examples), "--eval-data", str(holdout),
                  "--output-dir", str(out)]
    logs = [(root / f"{n}.log").open("wb") for n in ("server", *NAMES)]
    server = subprocess.Popen(server_cmd, env=server_env, stdout=logs[0], stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    clients = [subprocess.Popen([str(BIN / "flower-client"), "--config",
                                 str(pki.kits[n] / "client.toml"), "--data", str(data[n])],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
               for n, log in zip(NAMES, logs[1:], strict=True)]
    try:
        code = server.wait(args.timeout)
    finally:
        for proc in (*clients, server):
            stop_group(proc)
        for log in logs:
            log.close()
    if code != 0:
        raise SystemExit(f"flower-server exited {code}; see {root / 'server.log'}")
    journals = [out / "journal.jsonl", *(pki.kits[n] / "ledger" / "journal.jsonl"
                                         for n in NAMES)]
    return json.loads((out / "metrics.json").read_text("utf-8")), timeline(journals)


def timeline(journals: list[Path]) -> Timeline:
    """Latest time (epoch seconds) of each (event, round) across the audit journals.

    The coordinator journals ``sent`` when a round's train messages go out and
    ``received`` once all replies are in; each institution journals ``evaluate`` right
    after its local evaluation, before replying.
    """
    times: Timeline = {}
    for path in journals:
        for line in path.read_text("utf-8").splitlines():
            entry = json.loads(line)
            key = (entry["event"], int(entry.get("round") or 0))
            stamp = dt.datetime.fromisoformat(entry["time"]).timestamp()
            times[key] = max(times.get(key, stamp), stamp)
    return times


def anatomy(metrics: dict[str, Any], times: Timeline) -> list[dict[str, Any]]:
    """Split each training round's wall time into parts (seconds and shares).

    Train message (from the coordinator's ``sent`` to its ``received``): the slowest
    institution's process start-up, data, model load and training, and the rest of
    that span (transfer, Flower's scheduling and polling). Then the coordinator's
    aggregation; the evaluate message (until the last institution has evaluated: its
    own ClientApp process, data, model load, local evaluation); and the coordinator's
    remainder (evaluate replies, centralized evaluation, metrics, checkpoint).
    """
    rounds = []
    for entry in metrics["rounds"][1:]:
        n, wall = entry["round"], entry["seconds"]
        slowest = max(entry["institutions"].values(),
                      key=lambda i: sum(i["seconds"].get(p, 0.0) for p in PARTS))
        parts = {p: slowest["seconds"].get(p, 0.0) for p in PARTS}
        train_span = times[("received", n)] - times[("sent", n)]
        parts["transfer"] = max(train_span - sum(parts.values()), 0.0)
        parts["aggregation"] = entry["aggregate_seconds"] or 0.0
        evaluated = times.get(("evaluate", n))  # absent: no federated evaluation
        parts["evaluate"] = 0.0 if evaluated is None else max(
            evaluated - times[("received", n)] - parts["aggregation"], 0.0)
        parts["coordinator"] = max(wall - sum(parts.values()), 0.0)
        rounds.append({"round": n, "wall_seconds": wall, "seconds": parts,
                       "shares": {k: v / wall for k, v in parts.items()},
                       "overhead_share": 1 - parts["train"] / wall})
    return rounds


def main() -> None:
    """Measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    demo = simulation().DEMO_DEFAULTS
    parser.add_argument("--rounds", type=int, default=demo["num-rounds"])
    parser.add_argument("--local-epochs", type=int, default=demo["local-epochs"])
    parser.add_argument("--strategy", default=demo["strategy"])
    parser.add_argument("--examples", type=int, default=demo["max-examples"],
                        help="cap on training examples per institution (the demo's "
                        "--max-examples)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP threads per institution process (Ray's 1 per virtual "
                        "institution in the demo)")
    parser.add_argument("--server-threads", type=int, default=0,
                        help="OMP threads of the coordinator (0 = torch's default, as in "
                        "the demo)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep PKI, data, logs and outputs here (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    modes = {}
    for mode in MODES:
        logging.info("deployment: %s", mode)
        if args.workdir:
            (args.workdir / mode).mkdir(parents=True, exist_ok=True)
            metrics, times = run_deployment((args.workdir / mode).resolve(), args, mode)
        else:
            with tempfile.TemporaryDirectory(prefix="fedsilo-anatomy-") as tmp:
                metrics, times = run_deployment(Path(tmp), args, mode)
        modes[mode] = summarise(metrics, times)
    header = ["mode", "round", "wall s", *[f"{p} %" for p in COLUMNS], "overhead %"]
    rows = [[mode, r["round"], f"{r['wall_seconds']:.1f}",
             *[f"{100 * r['shares'][p]:.1f}" for p in COLUMNS],
             f"{100 * r['overhead_share']:.1f}"]
            for mode, doc in modes.items()
            for r in (*doc["rounds"], doc["steady"], doc["all_rounds"])]
    steady = {m: d["steady"] for m, d in modes.items()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = {"settings": settings, "modes": modes,
           "steady_round_seconds_warm_over_separate_eval": (
               steady["warm"]["wall_seconds"] / steady["separate-eval"]["wall_seconds"]),
           "target": {"overhead_share_limit": TARGET_OVERHEAD,
                      "met": steady["warm"]["overhead_share"] <= TARGET_OVERHEAD},
           "total_seconds": time.monotonic() - started}
    path = write("round_anatomy", doc, markdown(header, rows))
    print(markdown(header, rows))
    for mode, row in steady.items():
        logging.info("%s: steady round %.1f s, framework overhead %.1f %% (target ≤ %.0f %%)",
                     mode, row["wall_seconds"], 100 * row["overhead_share"],
                     100 * TARGET_OVERHEAD)
    logging.info("wrote %s", path)


def summarise(metrics: dict[str, Any], times: Timeline) -> dict[str, Any]:
    """Per-round anatomy, plus the steady rounds (2+) and all rounds pooled."""
    rounds = anatomy(metrics, times)
    return {"rounds": rounds, "steady": pooled("steady", rounds[1:] or rounds),
            "all_rounds": pooled("all", rounds),
            "centralized_eval_seconds_round0": metrics["rounds"][0]["seconds"],
            "final_accuracy": (metrics["rounds"][-1]["centralized_eval"] or {}).get(
                "accuracy")}


def pooled(name: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum of the rounds' parts, with shares of their summed wall time."""
    wall = sum(r["wall_seconds"] for r in rounds)
    seconds = {p: sum(r["seconds"][p] for r in rounds) for p in COLUMNS}
    return {"round": name, "wall_seconds": wall, "seconds": seconds,
            "shares": {p: v / wall for p, v in seconds.items()},
            "overhead_share": 1 - seconds["train"] / wall}


if __name__ == "__main__":
    main()
