#!/usr/bin/env python3
"""Utility vs privacy on ICD-10: federated at ε ∈ {1, 3, 8, ∞} and centralized, same epochs.

Each federated setting is the README demo (3 institutions, Dirichlet α = 0.5, the
demo's example cap) at one privacy level; "centralized" trains one institution on
the pooled data without DP for the same number of rounds × local epochs. All runs
use the same coordinator holdout, so accuracies compare directly.

    .venv/bin/python bench/utility.py   # writes bench/results/utility.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS, markdown, write

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "run_simulation.py"


def _run(name: str, flags: list[str], out: Path, common: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    cmd = [sys.executable, str(SCRIPT), *common, *flags, "--output-dir", str(out / name)]
    logging.info("%s: %s", name, " ".join(cmd[2:]))
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    doc = json.loads((out / name / "metrics.json").read_text("utf-8"))
    last = doc["rounds"][-1]
    held_out = last["centralized_eval"]
    eps = [s["epsilon"] for s in last["institutions"].values()]
    return {"setting": name, "flags": flags, "accuracy": held_out["accuracy"],
            "macro_f1": held_out["macro_f1"], "loss": held_out["loss"],
            "max_epsilon": None if None in eps else max(eps),
            "majority_rate": doc["holdout_majority_rate"],
            "seconds": time.monotonic() - started}


def main() -> None:
    """Run every setting and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--out", type=Path, default=RESULTS / "utility-runs")
    parser.add_argument("extra", nargs="*", help="more flags for every run, after --")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    common = ["--num-rounds", "3", *args.extra]
    results = [_run(f"federated-eps-{e:g}", ["--target-epsilon", str(e)], args.out, common)
               for e in args.epsilons]
    results.append(_run("federated-no-dp", ["--no-dp"], args.out, common))
    # One institution holding everything the three institutions hold, no DP.
    results.append(_run("centralized-no-dp", ["--no-dp", "--institutions", "1",
                                              "--max-examples", "18000"], args.out, common))
    central = results[-1]["accuracy"]
    rows = [[r["setting"], "∞" if r["max_epsilon"] is None else f"{r['max_epsilon']:.2f}",
             f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}",
             f"{100 * (r['accuracy'] - central):+.1f}", f"{r['seconds'] / 60:.1f}"]
            for r in results]
    table = markdown(["setting", "ε spent", "accuracy", "macro-F1", "vs centralized (points)",
                      "minutes"], rows)
    path = write("utility", {"results": results}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
