#!/usr/bin/env python3
"""DP fine-tuning over rounds: each --trainable recipe's accuracy per round at ε = 8.

One federated run is replayed in one process, as ``bench/schedule_sweep.py`` does for
the head: the institutions' Dirichlet shares, each running fedsilo's own DP-SGD
round (:func:`fedsilo.client.train.train_private`, noise calibrated for the whole
run), averaged with FedAvgM's server momentum (the demo's strategy), evaluated on a
holdout after every round. Each recipe is a ``--trainable`` set at its defaults
(``--encoder-learning-rate`` 0: the recipe's, common/bounds.py), so the curves are
what a user gets.

``--task icd10`` is the demo's data with the default MiniLM (on a CPU a smaller
setting: fewer records, shorter texts, fewer rounds; on CUDA the demo's;
``--encoder-layers N`` keeps MiniLM's first N layers, a cheaper pretrained encoder).
``--task toy`` is a task only attention solves (the label is the class of the token
after a marker) on a tiny BERT pretrained for it here without DP, so that fine-tuning
has pretrained structure to keep or to lose; it runs in minutes on a CPU.
``--candidates`` replays the same federation with one change each, to find why
LoRA degrades over rounds (docs/fine-tuning.md): ``persist`` keeps each institution's
AdamW state across rounds, ``fedavg`` drops server momentum, ``no-decay`` sets weight
decay to 0, ``freeze-a`` trains LoRA's B (and the head) only, ``lr-X`` sets the
encoder-side learning rate to X, ``head-X`` the head's, ``clip-X`` the clipping norm
(joined by ``+``: several at once). ``persist``, ``no-decay`` and ``freeze-a`` change
the optimiser factory or the trainable set inside this script.

    .venv/bin/python bench/finetune.py --task toy --trainables lora
        --candidates persist fedavg no-decay freeze-a lr-0.01 clip-0.1 --name finetune-toy
    .venv/bin/python bench/finetune.py --task icd10 --seeds 42 43 44  # finetune.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import markdown, write
from opacus.accountants import create_accountant
from torch.utils.data import TensorDataset
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification

import fedsilo.client.train as local
from fedsilo.client.privacy import plan
from fedsilo.common.bounds import default_delta
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.features import prepare
from fedsilo.common.model import (
    get_trainable_state,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
    set_trainable_state,
)
from fedsilo.common.records import LabelMap
from fedsilo.common.splits import simulated_institution, split_holdout
from fedsilo.common.task import encode, evaluate, federation_labels

#: The toy task: content tokens, their classes, the marker, the sequence length.
CONTENT, CLASSES, MARKER, LENGTH = 40, 4, 2100, 12


def relational(n: int, seed: int, fine: bool = False) -> TensorDataset:
    """Sequences of content tokens with one marker; the label is the next token's class."""
    g = torch.Generator().manual_seed(seed)
    ids = 2000 + torch.randint(0, CONTENT, (n, LENGTH), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    at = torch.randint(1, LENGTH - 2, (n,), generator=g)
    ids[torch.arange(n), at] = MARKER
    after = ids[torch.arange(n), at + 1] - 2000
    return TensorDataset(ids, torch.ones_like(ids), after if fine else after % CLASSES)


def pretrained_toy(folder: Path, epochs: int = 8) -> Path:
    """A 2-layer, 32-wide mean-pooling BERT trained without DP to name the marked token."""
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=3000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True}))
    cfg = FedsiloConfig.from_flat({"model": str(folder), "trainable": "all", "dp": False,
                                   "learning-rate": 3e-3, "encoder-learning-rate": 3e-3,
                                   "batch-size": 64, "local-epochs": epochs})
    model = load_model(cfg.model, LabelMap.from_names([f"t{i}" for i in range(CONTENT)]), 0)
    local.train_plain(model, relational(8000, 7, fine=True), cfg, torch.device("cpu"))
    model.save_pretrained(folder)  # the 40-way head is replaced by the task's 4-way one
    return folder


def truncated(source: Path, layers: int, folder: Path) -> Path:
    """MiniLM's embeddings and first ``layers`` layers (a cheaper pretrained encoder)."""
    if not folder.exists():
        encoder = AutoModel.from_pretrained(source)
        encoder.encoder.layer = encoder.encoder.layer[:layers]
        encoder.config.num_hidden_layers = layers
        encoder.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
        shutil.copytree(source / "1_Pooling", folder / "1_Pooling")
    return folder


Federation = tuple[FedsiloConfig, LabelMap, list[TensorDataset], TensorDataset]


def federation(args: argparse.Namespace, seed: int, tmp: Path) -> Federation:
    """The run's base config, labels, institutions' training sets and holdout."""
    if args.task == "toy":
        folder = tmp / "toy-bert"
        if not folder.exists():
            pretrained_toy(folder)
        cfg = FedsiloConfig.from_flat({"model": str(folder), "seed": seed,
                                       "batch-size": args.batch_size})
        shares = [relational(args.max_examples, 100 * seed + i) for i in range(args.institutions)]
        return (cfg, LabelMap.from_names([f"c{i}" for i in range(CLASSES)]), shares,
                relational(args.holdout, 100 * seed + 99))
    model = resolve_model_path("all-MiniLM-L6-v2")
    if args.encoder_layers:
        model = str(truncated(Path(model), args.encoder_layers, tmp / "minilm"))
    cfg = FedsiloConfig.from_flat({"seed": seed, "max-examples": args.max_examples,
                                   "max-length": args.max_length, "batch-size": args.batch_size,
                                   "model": model})
    labels, tokenizer = federation_labels(cfg), load_tokenizer(cfg.model)
    shares = [encode(tokenizer, simulated_institution(cfg.data, seed, i, args.institutions).train,
                     labels, args.max_length) for i in range(args.institutions)]
    held = encode(tokenizer, split_holdout(cfg.data, seed)[1], labels, args.max_length)
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed))
    return cfg, labels, shares, TensorDataset(*(t[pick[:args.holdout]] for t in held.tensors))


class _Candidate:
    """Changes to the replay (``--candidates``; several joined by ``+``); ``base``: none."""

    def __init__(self, name: str) -> None:
        self.name, self.parts, self.states = name, set(name.split("+")), {}
        self.optimizer: torch.optim.Optimizer | None = None

    def flat(self) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for part in self.parts:
            if part.startswith("lr-"):
                changes["encoder-learning-rate"] = float(part[3:])
            elif part.startswith("head-"):
                changes["learning-rate"] = float(part[5:])
            elif part.startswith("clip-"):
                changes["max-grad-norm"] = float(part[5:])
        return changes

    def momentum(self, server_momentum: float) -> float:
        return 0.0 if "fedavg" in self.parts else server_momentum

    def prepare(self, model: torch.nn.Module) -> None:
        if "freeze-a" in self.parts:
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)

    def optimizer_for(self, factory: Callable[..., torch.optim.Optimizer], institution: int
                      ) -> Callable[..., torch.optim.Optimizer]:
        """``fedsilo.client.train._optimizer`` (``factory``), with this candidate's change."""

        def build(model: torch.nn.Module, cfg: FedsiloConfig) -> torch.optim.Optimizer:
            optimizer = factory(model, cfg)
            if "no-decay" in self.parts:
                for group in optimizer.param_groups:
                    group["weight_decay"] = 0.0
            if "persist" in self.parts and institution in self.states:
                optimizer.load_state_dict(self.states[institution])
            self.optimizer = optimizer
            return optimizer

        return build

    def after_round(self, institution: int) -> None:
        if "persist" in self.parts and self.optimizer is not None:
            self.states[institution] = copy.deepcopy(self.optimizer.state_dict())


def replay(cfg: FedsiloConfig, labels: LabelMap, shares: list[TensorDataset],
           holdout: TensorDataset, device: torch.device, features: Path,
           candidate: _Candidate | None = None) -> list[float]:
    """Holdout accuracy after each of ``cfg``'s rounds of one DP federation at its ε."""
    candidate = candidate or _Candidate("base")
    cfg = cfg.replace(**candidate.flat())
    rounds, seed = cfg.federation.num_rounds, cfg.train.seed
    model = load_model(cfg.model, labels, seed)
    candidate.prepare(model)
    net, data = prepare(model, [*shares, holdout], device, features)
    shares, holdout = data[:-1], data[-1]
    sizes = [len(d) for d in shares]
    plans = [plan(num_examples=n, batch_size=cfg.train.batch_size,
                  local_epochs=cfg.train.local_epochs, num_rounds=rounds,
                  target_epsilon=cfg.privacy.target_epsilon, delta=default_delta(n),
                  accountant=cfg.privacy.accountant) for n in sizes]
    accountants = [create_accountant(cfg.privacy.accountant) for _ in shares]
    momentum, velocity, curve = candidate.momentum(cfg.federation.server_momentum), {}, []
    factory = local._optimizer
    try:
        for _ in range(rounds):
            start, trained = get_trainable_state(net), []
            for i, share in enumerate(shares):
                set_trainable_state(net, start)
                local._optimizer = candidate.optimizer_for(factory, i)
                local.train_private(net, share, cfg, plans[i], accountants[i], device)
                candidate.after_round(i)
                trained.append(get_trainable_state(net))
            mean = {k: sum(n * t[k] for n, t in zip(sizes, trained, strict=True)) / sum(sizes)
                    for k in start}  # FedAvgM at server learning rate 1, as Flower's
            velocity = {k: momentum * velocity.get(k, 0.0) + start[k] - mean[k] for k in start}
            set_trainable_state(net, {k: start[k] - velocity[k] for k in start})
            curve.append(evaluate(net, holdout, device).accuracy)
            logging.info("%s %s seed %d round %d: %.3f", cfg.model.trainable, candidate.name,
                         seed, len(curve), curve[-1])
    finally:
        local._optimizer = factory
    return curve


def main() -> None:
    """Run every recipe (and candidate) for every seed and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["icd10", "toy"], default="icd10")
    parser.add_argument("--trainables", nargs="+", default=["classifier", "lora", "all"],
                        choices=["classifier", "lora", "top-k", "all"])
    parser.add_argument("--candidates", nargs="+", default=["base"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--institutions", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="default: 20 on CUDA, 10 on a CPU")
    parser.add_argument("--local-epochs", type=int, help="default: 3 on CUDA, 1 on a CPU")
    parser.add_argument("--max-examples", type=int, help="per institution; default: 6000 on "
                        "CUDA (the demo's), 500 on a CPU")
    parser.add_argument("--max-length", type=int, help="default: 24 on CUDA, 16 on a CPU")
    parser.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 64 on a CPU")
    parser.add_argument("--holdout", type=int, default=1000, help="holdout records used")
    parser.add_argument("--encoder-layers", type=int, default=0,
                        help="icd10: keep MiniLM's first N layers only (0 = all 6)")
    parser.add_argument("--name", default="finetune")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    for key, on_gpu, on_cpu in (("rounds", 20, 10), ("local_epochs", 3, 1),
                                ("max_examples", 6000, 500), ("max_length", 24, 16),
                                ("batch_size", 256, 64)):
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    started, results = time.monotonic(), []
    with tempfile.TemporaryDirectory() as tmp:
        for trainable in args.trainables:
            for name in args.candidates:
                curves = {}
                for seed in args.seeds:
                    cfg, labels, shares, holdout = federation(args, seed, Path(tmp))
                    cfg = cfg.replace(trainable=trainable, local_epochs=args.local_epochs,
                                      num_rounds=args.rounds, target_epsilon=args.epsilon)
                    curves[seed] = replay(cfg, labels, shares, holdout, device,
                                          Path(tmp) / "features", _Candidate(name))
                results.append({"trainable": trainable, "candidate": name,
                                "accuracy_per_round": {str(s): c for s, c in curves.items()}})
    rows = []
    for r in results:
        curves = list(r["accuracy_per_round"].values())
        mean = [statistics.mean(c[i] for c in curves) for i in range(args.rounds)]
        best = max(range(args.rounds), key=mean.__getitem__)
        r |= {"mean_per_round": mean, "final": mean[-1], "best": mean[best], "best_round": best + 1}
        shown = sorted({0, math.ceil(args.rounds / 3) - 1, best, args.rounds - 1})
        rows.append([r["trainable"], r["candidate"], len(curves),
                     " ".join(f"r{i + 1} {mean[i]:.3f}" for i in shown),
                     f"{mean[best]:.3f} (r{best + 1})", f"{mean[-1]:.3f}"])
    table = markdown(["trainable", "candidate", "seeds", "mean accuracy by round", "best",
                      "final"], rows)
    settings = {k: v for k, v in vars(args).items()} | {"device": str(device)}
    path = write(args.name, {"settings": settings, "results": results,
                             "total_seconds": time.monotonic() - started}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
