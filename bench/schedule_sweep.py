#!/usr/bin/env python3
"""Which training schedule the demo should run: a fast in-process sweep at ε = 8.

The demo trains only the head, on the frozen encoder's features, so one federated
run can be replayed in one process in seconds: the demo's three institutions
(their exact shares, features computed once), each running fedsilo's own DP-SGD
round (:func:`fedsilo.client.train.train_private`, noise calibrated by
:func:`fedsilo.client.privacy.plan` for the whole run), averaged by FedAvg weighted
by examples (or with FedAvgM's server momentum), evaluated on the demo's holdout.
Every pooling (``--pooling`` mean, the default's choice for MiniLM, and cls),
strategy, schedule (rounds × local epochs), expected batch size, learning rate and
clipping norm is run ``--repeats`` times per data seed (the DP noise differs between
repeats; a seed gives other shares, holdout and initial head), beside a centralized
non-private run on that seed's pooled shares with the same number of epochs (at the
demo's batch size and learning rate); the table gives each seed's gap in points.
``bench/utility.py`` then measures the chosen schedule end to end.

    .venv/bin/python bench/schedule_sweep.py   # writes bench/results/schedule_sweep.{json,md}
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import time
import warnings

import torch
from benchlib import RESULTS, markdown, simulation, write
from opacus.accountants import create_accountant
from torch.utils.data import TensorDataset

from fedsilo.client.privacy import plan
from fedsilo.client.train import train_plain, train_private
from fedsilo.common.bounds import default_delta
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.features import Head, prepare
from fedsilo.common.model import (
    get_trainable_state,
    load_model,
    load_tokenizer,
    set_trainable_state,
)
from fedsilo.common.splits import simulated_institution, split_holdout
from fedsilo.common.task import encode, evaluate, federation_labels

INSTITUTIONS = 3
DEVICE = torch.device("cpu")


def features(cfg: FedsiloConfig) -> tuple[Head, list[TensorDataset], TensorDataset]:
    """The untrained head, and the demo institutions' and the holdout's features."""
    labels = federation_labels(cfg)
    model = load_model(cfg.model, labels, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    shares = [simulated_institution(cfg.data, cfg.train.seed, pid, INSTITUTIONS).train
              for pid in range(INSTITUTIONS)]
    _, holdout = split_holdout(cfg.data, cfg.train.seed)
    if holdout is None:
        raise SystemExit("the demo has no holdout (--holdout-fraction 0)")
    tokens = [encode(tokenizer, r, labels, cfg.model.max_length) for r in (*shares, holdout)]
    head, feats = prepare(model, tokens, DEVICE, RESULTS / "schedule-sweep-runs")
    if not isinstance(head, Head):
        raise SystemExit("this sweep needs --trainable classifier (the head on features)")
    return head, feats[:-1], feats[-1]


def run(head: Head, initial: dict[str, torch.Tensor], cfg: FedsiloConfig,
        shares: list[TensorDataset], holdout: TensorDataset, dp: bool) -> float:
    """Holdout accuracy of one federated run of ``cfg`` from ``initial``.

    FedAvg weighted by examples; with ``cfg``'s strategy ``fedavgm``, server momentum
    as in Flower's FedAvgM at server learning rate 1 (``v ← m·v + (x − avg)``,
    ``x ← x − v``).
    """
    set_trainable_state(head, initial)
    momentum = cfg.federation.server_momentum if cfg.federation.strategy == "fedavgm" else 0.0
    velocity: dict[str, torch.Tensor] = {}
    weights = [len(d) for d in shares]
    plans = [plan(num_examples=n, batch_size=cfg.train.batch_size,
                  local_epochs=cfg.train.local_epochs, num_rounds=cfg.federation.num_rounds,
                  target_epsilon=cfg.privacy.target_epsilon, delta=default_delta(n),
                  accountant=cfg.privacy.accountant) for n in weights] if dp else []
    accountants = [create_accountant(cfg.privacy.accountant) for _ in shares]
    for _ in range(cfg.federation.num_rounds):
        start, trained = get_trainable_state(head), []
        for i, data in enumerate(shares):
            set_trainable_state(head, start)
            if dp:
                train_private(head, data, cfg, plans[i], accountants[i], DEVICE)
            else:
                train_plain(head, data, cfg, DEVICE)
            trained.append(get_trainable_state(head))
        total = sum(weights)
        step = {name: start[name] - sum(w * t[name] for w, t in zip(weights, trained,
                                                                    strict=True)) / total
                for name in start}
        velocity = {name: momentum * velocity.get(name, 0.0) + step[name] for name in start}
        set_trainable_state(head, {name: start[name] - velocity[name] for name in start})
    return evaluate(head, holdout, DEVICE).accuracy


def main() -> None:
    """Run the sweep and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--poolings", nargs="+", default=["mean", "cls"],
                        choices=["mean", "cls"])
    parser.add_argument("--strategies", nargs="+", default=["fedavg"],
                        choices=["fedavg", "fedavgm"])
    parser.add_argument("--schedules", nargs="+", default=["3x1", "3x3", "5x3", "10x3"],
                        help="ROUNDSxEPOCHS")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.01, 0.03])
    parser.add_argument("--clip-norms", type=float, nargs="+", default=[1.0],
                        help="per-example clipping norms (--max-grad-norm)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="data seeds: each gives other shares, holdout and start")
    parser.add_argument("--repeats", type=int, default=2, help="DP runs per seed")
    parser.add_argument("--name", default="schedule_sweep",
                        help="writes bench/results/NAME.{json,md}")
    args = parser.parse_args()
    # force: importing Opacus has already given the root logger a WARNING-level handler.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    # Opacus warns on every step that the head's inputs need no gradient (they are features).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"opacus\.")
    sim = simulation()
    base = sim.resolve_config(sim.build_parser().parse_args([]))
    started = time.monotonic()
    schedules = [tuple(int(x) for x in s.split("x")) for s in args.schedules]
    settings = list(itertools.product(args.poolings, args.strategies, schedules,
                                      args.batch_sizes, args.learning_rates, args.clip_norms))
    accs: dict[tuple, dict[int, list[float]]] = {s: {} for s in settings}
    central: dict[tuple, float] = {}  # (pooling, seed, rounds, epochs) → accuracy
    examples: dict[int, list[int]] = {}
    holdouts: dict[int, int] = {}
    head_parameters: dict[str, int] = {}
    for pooling, seed in itertools.product(args.poolings, args.seeds):
        seeded = base.replace(pooling=pooling, seed=seed)
        head, shares, holdout = features(seeded)
        examples[seed], holdouts[seed] = [len(d) for d in shares], len(holdout)
        head_parameters[pooling] = sum(p.numel() for p in head.parameters())
        initial = get_trainable_state(head)
        pooled = [TensorDataset(*(torch.cat(t) for t in zip(*(d.tensors for d in shares),
                                                              strict=True)))]
        for r, e in schedules:  # centralized: one holder of all records, plain FedAvg
            central[pooling, seed, r, e] = run(
                head, initial, seeded.replace(strategy="fedavg", num_rounds=r, local_epochs=e),
                pooled, holdout, dp=False)
        for setting in (s for s in settings if s[0] == pooling):
            _, strategy, (rounds, epochs), bs, lr, clip = setting
            cfg = seeded.replace(strategy=strategy, num_rounds=rounds, local_epochs=epochs,
                                 batch_size=bs, learning_rate=lr, max_grad_norm=clip)
            accs[setting][seed] = [run(head, initial, cfg, shares, holdout, dp=True)
                                   for _ in range(args.repeats)]
            logging.info("%s seed %d: ε = 8 federated %s, centralized %.3f", setting, seed,
                         accs[setting][seed], central[pooling, seed, rounds, epochs])
    results, rows = [], []
    for setting in settings:
        pooling, strategy, (rounds, epochs), bs, lr, clip = setting
        gaps = {seed: 100 * (central[pooling, seed, rounds, epochs] - statistics.mean(a))
                for seed, a in accs[setting].items()}
        flat = [x for a in accs[setting].values() for x in a]
        cent = [central[pooling, seed, rounds, epochs] for seed in args.seeds]
        results.append({"pooling": pooling, "head_parameters": head_parameters[pooling],
                        "strategy": strategy, "rounds": rounds,
                        "epochs": epochs, "batch_size": bs, "learning_rate": lr,
                        "max_grad_norm": clip,
                        "epsilon": base.privacy.target_epsilon,
                        "federated_accuracies": {str(k): v for k, v in accs[setting].items()},
                        "centralized_no_dp_accuracy": {
                            str(seed): central[pooling, seed, rounds, epochs]
                            for seed in args.seeds},
                        "gap_points": {str(k): v for k, v in gaps.items()}})
        rows.append([pooling, strategy, f"{rounds} × {epochs}", bs, lr, clip,
                     f"{statistics.mean(flat):.3f}", f"{min(flat):.3f}–{max(flat):.3f}",
                     f"{statistics.mean(cent):.3f}",
                     " / ".join(f"{gaps[seed]:.1f}" for seed in args.seeds),
                     f"{max(gaps.values()):.1f}"])
    table = markdown(["pooling", "strategy", "rounds × local epochs", "batch", "learning rate",
                      "clip norm", "ε = 8 federated accuracy (mean)", "range",
                      "centralized no-DP (mean)", "gap per seed (points)", "worst gap"], rows)
    path = write(args.name, {"institutions": INSTITUTIONS, "repeats": args.repeats,
                             "seeds": args.seeds,
                             "examples": {str(k): v for k, v in examples.items()},
                             "holdout_examples": {str(k): v for k, v in holdouts.items()},
                             "results": results,
                             "total_seconds": time.monotonic() - started}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
