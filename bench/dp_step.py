#!/usr/bin/env python3
"""DP-SGD step vs non-private step: time and peak memory per clipping mode and trainable set.

Every (trainable set, mode) pair trains the default MiniLM classifier on the same
random batch; modes are measured alternately, ``--repeats`` times, and reported as
median ratios to the non-private step measured in the same run. ``head-features``
is what the default (``--trainable classifier``) runs in a federation: the head
alone on the frozen encoder's cached features of that batch.

Model and batch go to ``--device`` (``auto``: CUDA when present); on a GPU every timed
stretch starts and ends with ``torch.cuda.synchronize()``, so a step's time includes
its kernels, not only their launch. Peak memory is what training adds to the loaded
model: on a GPU the growth of CUDA allocated bytes over the timed steps. On a CPU it
is the growth of the resident set (``VmHWM`` over ``VmRSS``) from before the first
step (so it counts gradients, per-sample gradients, optimizer state and activations)
through a second, measured in a second process whose glibc has a fixed mmap
threshold (``MALLOC_MMAP_THRESHOLD_``):
otherwise freed memory stays resident for reuse and the growth depends on which
mode ran before. That setting slows allocation, so times come from the first pass.

    .venv/bin/python bench/dp_step.py            # writes bench/results/dp_step.{json,md}
    .venv/bin/python bench/dp_step.py --seq 128 --trainable all --modes bk ghost \
        --name dp_step-seq128                    # the issue's setting, all layers
    .venv/bin/python bench/dp_step.py --device cuda --batch 32 --seq 128 \
        --trainable all lora --modes bk ghost hooks --name dp_step-cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from benchlib import markdown, peak, reset_peak, write
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.client.train import make_private
from fedsilo.common import features
from fedsilo.common.config import ModelConfig
from fedsilo.common.features import logits
from fedsilo.common.model import load_model, resolve_device
from fedsilo.common.records import LabelMap

MODES = ("bk", "ghost", "hooks", "functorch", "ew")
TRAINABLE = ("all", "top-k", "lora", "classifier", "head-features")
#: Every allocation of 64 KiB or more is its own mapping, unmapped when freed.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def prepare(model: nn.Module, data: TensorDataset, mode: str, device: torch.device
            ) -> tuple[nn.Module, torch.optim.Optimizer, Any, list[torch.Tensor]]:
    """A copy of ``model`` made private (``mode``, or ``none``) and one batch, on ``device``."""
    model = copy.deepcopy(model).train().to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    criterion: Any = nn.CrossEntropyLoss()
    loader = DataLoader(data, batch_size=len(data))
    if mode != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = make_private(PrivacyEngine(), model, optimizer, loader, mode=mode,
                                   noise_multiplier=1.0, max_grad_norm=1.0,
                                   poisson_sampling=False)
        model, optimizer, criterion, loader = (private.model, private.optimizer,
                                               private.criterion, private.loader)
    return model, optimizer, criterion, [t.to(device) for t in next(iter(loader))]


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs them asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(model: nn.Module, data: TensorDataset, mode: str, steps: int, device: torch.device,
         cold: bool = False) -> tuple[float, int]:
    """Seconds per step (after one warm-up step) and peak extra bytes of ``steps`` steps.

    ``cold``: the peak counts from before the warm-up step, so it includes what the
    first step allocates and keeps (gradients, per-sample gradients, optimizer state).
    """
    model, optimizer, criterion, batch = prepare(model, data, mode, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(logits(model, *batch[:-1]), batch[-1]).backward()
        optimizer.step()

    synchronize(device)
    base = reset_peak(device)
    step()  # warm-up: allocations, hooks
    synchronize(device)
    if not cold:
        base = reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, max(peak(device) - base, 0)


def _measure(args: argparse.Namespace, trainable: str
             ) -> tuple[dict[str, list[tuple[float, int]]], dict[str, str]]:
    """``(seconds, peak bytes)`` samples per mode for one trainable set, and failures."""
    labels = LabelMap.from_names([f"c{i}" for i in range(22)])
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(1000, 20000, (args.batch, args.seq)),
                         torch.ones(args.batch, args.seq, dtype=torch.long),
                         torch.randint(0, 22, (args.batch,)))
    base = "classifier" if trainable == "head-features" else trainable
    model, inputs = load_model(ModelConfig(trainable=base), labels, seed=0), data
    if trainable == "head-features":
        model, inputs = features.Head(model), features.extract(model, data, args.device)
    samples: dict[str, list[tuple[float, int]]] = {m: [] for m in ("none", *args.modes)}
    errors: dict[str, str] = {}
    for _ in range(args.repeats):
        for mode in samples:  # alternate modes within each repeat
            if mode in errors:
                continue
            try:
                samples[mode].append(_run(model, inputs, mode, args.steps, args.device,
                                          cold=args.memory_pass))
            except Exception as err:  # noqa: BLE001 - an unsupported mode is a result
                errors[mode] = f"{type(err).__name__}: {str(err)[:200]}"
            logging.info("%s %s %s", trainable, mode, samples[mode][-1:] or errors[mode])
    return samples, errors


def _cpu_peaks(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Peak bytes per trainable set and mode, from a process with a fixed mmap threshold."""
    cmd = [sys.executable, __file__, "--memory-pass", "--device", "cpu", "--batch", str(args.batch),
           "--seq", str(args.seq), "--trainable", *args.trainable, "--modes", *args.modes]
    done = subprocess.run(cmd, env={**os.environ, **MMAP_ENV}, check=True, text=True,
                          stdout=subprocess.PIPE)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trainable", nargs="+", default=list(TRAINABLE), choices=TRAINABLE)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="DP modes to measure beside the non-private step")
    parser.add_argument("--name", default="dp_step", help="results file name")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--memory-pass", action="store_true",
                        help="internal: print one step's peak bytes per set and mode as JSON")
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.memory_pass:
        args.steps, args.repeats = 1, 1
        print(json.dumps({t: {m: v[0][1] for m, v in _measure(args, t)[0].items() if v}
                          for t in args.trainable}))
        return
    measured = {t: _measure(args, t) for t in args.trainable}
    cpu_peaks = _cpu_peaks(args) if args.device.type == "cpu" else None
    results: list[dict[str, Any]] = []
    rows = []
    for trainable, (samples, errors) in measured.items():
        if cpu_peaks is not None:
            samples = {m: [(s, cpu_peaks[trainable][m]) for s, _ in v]
                       for m, v in samples.items()}
        base_s = statistics.median(s for s, _ in samples["none"])
        base_m = statistics.median(m for _, m in samples["none"])
        for mode, values in samples.items():
            entry: dict[str, Any] = {"trainable": trainable, "mode": mode}
            if mode in errors:
                entry["error"] = errors[mode]
                rows.append([trainable, mode, "unsupported", "", "", ""])
            else:
                sec = statistics.median(s for s, _ in values)
                mem = statistics.median(m for _, m in values)
                mem_ratio = mem / base_m if base_m else None  # head only: ~0 extra bytes
                entry |= {"seconds_per_step": sec, "peak_extra_bytes": mem,
                          "time_ratio": sec / base_s, "memory_ratio": mem_ratio,
                          "samples": values}
                rows.append([trainable, mode, f"{sec:.3f}", f"{sec / base_s:.2f}",
                             f"{mem / 2**20:.0f}",
                             "n/a" if mem_ratio is None else f"{mem_ratio:.2f}"])
            results.append(entry)
    table = markdown(["trainable", "mode", "s/step", "time ×", "peak MiB", "memory ×"], rows)
    settings = vars(args) | {"device": str(args.device),
                             "cpu_memory_env": None if cpu_peaks is None else MMAP_ENV}
    path = write(args.name, {"settings": settings, "results": results}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
