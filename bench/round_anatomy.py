#!/usr/bin/env python3
"""Round anatomy of a real deployment on loopback: where a round's wall time goes.

Provisions a PKI, starts ``flower-server`` (TLS, node authentication, DP) and two
``flower-client``s on 127.0.0.1, each with its own slice of ICD-10, runs the default
settings for ``--rounds`` rounds, and splits every round's wall time (from
``metrics.json``) into: ClientApp process start-up and imports, data preparation,
model load, training, the coordinator's aggregation, and the rest (serialisation,
transfer, Flower's scheduling, evaluation). The two institutions run in parallel, so
each institution-side share is the slower institution's.

    .venv/bin/python bench/round_anatomy.py   # writes bench/results/round_anatomy.{json,md}
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import markdown, write

from fedsilo.common.data import load_records
from fedsilo.common.processes import BIN, child_env, free_port, stop_group
from fedsilo.server.provision import provision

PARTS = ("process", "data", "model", "train")
NAMES = ("hospital-a", "hospital-b")


def _datasets(root: Path, per_institution: int) -> dict[str, Path]:
    icd = load_records("icd10")
    paths = {}
    for j, name in enumerate(NAMES):
        paths[name] = root / f"{name}.csv"
        with paths[name].open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            stride = max(len(icd) // (2 * per_institution), 1)  # every chapter, both sites
            for i in range(j * stride // 2, len(icd), stride)[:per_institution]:
                writer.writerow([icd.texts[i], icd.labels[i]])
    return paths


def run_deployment(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the federation; return its ``metrics.json``."""
    port = free_port()
    pki = provision(root / "pki", ["localhost"], list(NAMES), port=port)
    data = _datasets(root, args.examples)
    env = child_env(OMP_NUM_THREADS=str(args.threads))
    out = root / "out"
    server_cmd = [str(BIN / "flower-server"), "--pki", str(root / "pki"), "--state-dir",
                  str(root / "state"), "--host", "127.0.0.1", "--port", str(port),
                  "--num-rounds", str(args.rounds), "--min-available", "2", "--min-train", "2",
                  "--output-dir", str(out)]
    logs = [(root / f"{n}.log").open("wb") for n in ("server", *NAMES)]
    server = subprocess.Popen(server_cmd, env=env, stdout=logs[0], stderr=subprocess.STDOUT,
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
    return json.loads((out / "metrics.json").read_text("utf-8"))


def anatomy(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Split each training round's wall time into parts (seconds and shares)."""
    rounds = []
    for entry in metrics["rounds"][1:]:
        wall = entry["seconds"]
        parts = {p: max(i["seconds"].get(p, 0.0) for i in entry["institutions"].values())
                 for p in PARTS}
        parts["aggregation"] = entry["aggregate_seconds"] or 0.0
        parts["other"] = max(wall - sum(parts.values()), 0.0)
        rounds.append({"round": entry["round"], "wall_seconds": wall, "seconds": parts,
                       "shares": {k: v / wall for k, v in parts.items()},
                       "overhead_share": 1 - parts["train"] / wall})
    return rounds


def main() -> None:
    """Measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=6000,
                        help="training records per institution (the demo's cap)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep PKI, data, logs and outputs here (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        metrics = run_deployment(args.workdir.resolve(), args)
    else:
        with tempfile.TemporaryDirectory(prefix="fedsilo-anatomy-") as tmp:
            metrics = run_deployment(Path(tmp), args)
    rounds = anatomy(metrics)
    header = ["round", "wall s", *[f"{p} %" for p in (*PARTS, "aggregation", "other")],
              "overhead %"]
    rows = [[r["round"], f"{r['wall_seconds']:.1f}",
             *[f"{100 * r['shares'][p]:.1f}" for p in (*PARTS, "aggregation", "other")],
             f"{100 * r['overhead_share']:.1f}"] for r in rounds]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write("round_anatomy", {"settings": settings, "rounds": rounds,
                                   "total_seconds": time.monotonic() - started},
                 markdown(header, rows))
    print(markdown(header, rows))
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
