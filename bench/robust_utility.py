#!/usr/bin/env python3
"""Accuracy at ε = 8 of median and trimmed mean against the demo's FedAvgM, same seeds.

What a robust aggregator costs on the demo, every setting measured in one run. Each
setting is the README demo (3 institutions, Dirichlet α = 0.5, the demo's example cap,
rounds and local epochs, record-level DP at ε = 8) with only ``--strategy`` changed;
all evaluate on the same coordinator holdout, so accuracies compare directly. With 3
institutions ``--strategy median`` takes the coordinate-wise middle update, and
``trimmed-mean`` at the default ``--trim-fraction 0.2`` trims ⌊0.2 · 3⌋ = 0 of them (an
unweighted mean); ``--trim-fraction 0.34`` would trim one each side, i.e. the median.
Both are unweighted: an institution's update counts the same whatever its size.

    .venv/bin/python bench/robust_utility.py   # writes bench/results/robust_utility.{json,md}
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS, markdown, write
from utility import run_setting

STRATEGIES = ("fedavgm", "median", "trimmed-mean")


def main() -> None:
    """Run every strategy for every seed and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=STRATEGIES)
    parser.add_argument("--out", type=Path, default=RESULTS / "robust-utility-runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    for seed in args.seeds:
        out = args.out.resolve() / f"seed-{seed}"
        for strategy in args.strategies:
            run = run_setting(strategy, ["--strategy", strategy, "--target-epsilon", "8"], out,
                       ["--seed", str(seed)])
            results.append({**run, "seed": seed, "strategy": strategy})
    base = {r["seed"]: r["accuracy"] for r in results if r["strategy"] == "fedavgm"}
    rows = []
    for strategy in args.strategies:
        runs = [r for r in results if r["strategy"] == strategy]
        acc = [r["accuracy"] for r in runs]
        gaps = [100 * (r["accuracy"] - base[r["seed"]]) for r in runs if r["seed"] in base]
        rows.append([strategy, f"{statistics.mean(acc):.3f}",
                     f"{min(acc):.3f} to {max(acc):.3f}",
                     f"{statistics.mean(r['macro_f1'] for r in runs):.3f}",
                     f"{statistics.mean(gaps):+.1f}" if gaps else "",
                     f"{max(r['max_epsilon'] for r in runs):.2f}",
                     f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f}"])
    table = markdown(["strategy", "accuracy (mean)", "range", "macro-F1 (mean)",
                      "vs FedAvgM (points, mean)", "ε spent (max)", "minutes per run"], rows)
    path = write("robust_utility", {"settings": {"seeds": args.seeds,
                                                 "strategies": args.strategies,
                                                 "target_epsilon": 8.0},
                                    "results": results,
                                    "total_seconds": time.monotonic() - started}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
