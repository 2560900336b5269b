#!/usr/bin/env python3
"""Book-keeping step time of this tree against an earlier commit's, alternated in one run.

The earlier ``client/bk_clipping.py`` is read from git (``--base``) and put in place of
this tree's inside :func:`fedsilo.client.train.make_private`; both then run
``bench/dp_step.py``'s timed steps on the same model and batch, alternating
``--repeats`` times; the table gives each version's fastest step (the least disturbed
by other work on the machine) and median, and this tree's time as a ratio to the
earlier one's, beside the non-private step.

    .venv/bin/python bench/bk_versions.py --base d9669e7   # bench/results/bk_versions.json
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import dp_step
import torch
from benchlib import markdown, write
from torch.utils.data import TensorDataset

import fedsilo.client.bk_clipping as current
import fedsilo.client.train as local
from fedsilo.common.config import ModelConfig
from fedsilo.common.model import load_model, resolve_device
from fedsilo.common.records import LabelMap

ROOT = Path(__file__).resolve().parents[1]


def earlier(commit: str, folder: Path) -> object:
    """``client/bk_clipping.py`` as of ``commit``, imported as a module.

    Commits before the rename hold it as ``client/bookkeeping.py``.
    """
    for name in ("client/bk_clipping.py", "client/bookkeeping.py"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"],
                               capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"--base {commit}: no client/bk_clipping.py or client/bookkeeping.py")
    source = shown.stdout
    path = folder / "bookkeeping_base.py"
    path.write_text(source, "utf-8")
    spec = importlib.util.spec_from_file_location("bookkeeping_base", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    """Time both versions alternately and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="d9669e7", help="the earlier commit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trainable", nargs="+", default=["all", "lora"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="bk_versions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"base": earlier(args.base, Path(tmp)), "this": current}
        labels = LabelMap.from_names([f"c{i}" for i in range(22)])
        torch.manual_seed(0)
        data = TensorDataset(torch.randint(1000, 20000, (args.batch, args.seq)),
                             torch.ones(args.batch, args.seq, dtype=torch.long),
                             torch.randint(0, 22, (args.batch,)))
        rows, results = [], []
        for trainable in args.trainable:
            model = load_model(ModelConfig(trainable=trainable), labels, seed=0)
            seconds: dict[str, list[float]] = {"none": [], "base": [], "this": []}
            for _ in range(args.repeats):
                for version in seconds:
                    module = versions.get(version, current)
                    local.BookKeepingClipper = module.BookKeepingClipper
                    local.BookKeepingLoss = module.BookKeepingLoss
                    mode = "none" if version == "none" else "bk"
                    seconds[version].append(
                        dp_step._run(model, data, mode, args.steps, device)[0])
                    logging.info("%s %s %.3f s", trainable, version, seconds[version][-1])
            median = {k: statistics.median(v) for k, v in seconds.items()}
            fastest = {k: min(v) for k, v in seconds.items()}
            results.append({"trainable": trainable, "seconds": seconds, "median": median,
                            "fastest": fastest,
                            "this_over_base_fastest": fastest["this"] / fastest["base"],
                            "this_over_base_median": median["this"] / median["base"]})
            rows.append([trainable] + [f"{fastest[k]:.3f} / {median[k]:.3f}" for k in seconds]
                        + [f"{fastest['this'] / fastest['base']:.2f} / "
                           f"{median['this'] / median['base']:.2f}"])
    local.BookKeepingClipper, local.BookKeepingLoss = (current.BookKeepingClipper,
                                                       current.BookKeepingLoss)
    table = markdown(["trainable", "non-private s/step (fastest / median)",
                      f"bk {args.base}", "bk this tree", "this / base"], rows)
    settings = vars(args) | {"device": str(device)}
    path = write(args.name, {"settings": settings, "results": results}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    sys.exit(main())
