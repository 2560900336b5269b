#!/usr/bin/env python3
"""Simulation scale: wall time and coordinator memory at 10, 50 and 100 institutions.

Each setting runs ``simulations/run_simulation.py`` with a tiny randomly initialised
BERT (saved to a temporary folder and passed with ``--model``), a few ICD-10 examples
per institution (IID split), DP-SGD on and ``--rounds`` rounds. Every tensor trains
(``--trainable all``), so each institution's update is the whole model and a
coordinator that kept one update (or one outgoing model) per institution would grow
by about one model size per institution. ``--hidden 32 128`` repeats everything with a
second, larger model, to tell growth with the model from the fixed cost of the
Python, PyTorch and Ray runtime.

In Flower 1.41's simulation mode the process tree is ``flower-superlink`` →
``flower-superexec`` → ``flwr-simulation``; ``flwr-simulation`` runs the ServerApp
(fedsilo's strategy, aggregation and centralized evaluation) in a thread over an
in-memory grid *and* drives the Ray backend, whose workers (``ray::ClientAppActor``)
run the virtual institutions. So ``flwr-simulation`` is the coordinator. A sampler
thread polls ``/proc`` every ``--interval`` seconds for every descendant of the
simulation command and records each process's resident memory by role; a process's
peak is its own high-water mark (``VmHWM``), so it is exact, not limited by the
sampling interval.

    .venv/bin/python bench/sim_scale.py --hidden 32 128   # writes bench/results/sim_scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from benchlib import markdown, write
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from fedsilo.common.config import ModelConfig
from fedsilo.common.model import load_model, resolve_model_path
from fedsilo.common.records import LabelMap, icd10_label_names

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "run_simulation.py"
MIB = 2**20
# Ray's own services; every other ``ray::`` process is a worker running institutions.
RAY_INFRA = ("gcs_server", "raylet", "dashboard.py", "monitor.py", "log_monitor.py",
             "agent.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def tiny_bert(folder: Path, labels: LabelMap, hidden: int, layers: int) -> Path:
    """Save a randomly initialised BERT (bundled MiniLM tokenizer) to ``folder``."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=128, num_labels=labels.num_labels,
                        id2label=labels.id2label, label2id=labels.label2id)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(folder)
    return folder


def role(argv: list[str]) -> str:
    """Which part of the simulation a process is, from its command line."""
    if not argv:
        return "other"
    if argv[0].startswith("ray::"):  # Ray sets its processes' titles
        if argv[0] in RAY_INFRA:
            return "ray-infra"
        return "ray-actor" if argv[0].startswith("ray::ClientAppActor") else "ray-worker"
    names = [Path(a).name for a in argv[:3]]  # the executable, or python [-u] script
    if names[0] in RAY_INFRA:  # gcs_server, raylet (binaries)
        return "ray-infra"
    if "default_worker.py" in names:  # a Ray worker before it has renamed itself
        return "ray-worker"
    if any(n in RAY_INFRA for n in names):
        return "ray-infra"
    for name, what in (("flwr-simulation", "coordinator"), ("flower-superexec", "superexec"),
                       ("flower-superlink", "superlink"), ("run_simulation.py", "launcher"),
                       ("flwr", "flwr-cli")):
        if name in names:
            return what
    return "other"


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of ``pid`` in bytes (empty once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, for every process on the machine."""
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree[ppid].append(int(entry.name))
    return tree


@dataclass
class Sampler:
    """Poll the resident memory of every descendant of ``root`` until stopped."""

    root: int
    interval: float
    started: float = field(default_factory=time.monotonic)
    procs: dict[int, dict[str, Any]] = field(default_factory=dict)
    role_peaks: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    coordinator_trace: list[tuple[float, int]] = field(default_factory=list)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (after one last sample)."""
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        """Record one sample of every descendant's memory."""
        tree, totals = _children(), defaultdict(int)
        todo: list[tuple[int, list[str]]] = [(self.root, [])]
        now = time.monotonic() - self.started
        while todo:
            pid, parent_argv = todo.pop()
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                    "utf-8", "replace").split("\0")
            except OSError:
                continue
            todo += [(child, argv) for child in tree.get(pid, [])]
            mem = _status(pid)
            if not mem or argv == parent_argv:
                continue  # gone, or forked and not yet exec'd: its pages are the parent's
            what = role([a for a in argv if a])
            info = self.procs.setdefault(pid, {"role": what, "peak_rss": 0, "peak_anon": 0,
                                               "first_seen": now})
            if what != "other":  # a process's title can change (Ray workers rename)
                info["role"] = what
            info |= {"name": " ".join(argv)[:120], "last_seen": now,
                     "peak_rss": max(info["peak_rss"], mem.get("VmHWM", 0),
                                     mem.get("VmRSS", 0)),
                     "peak_anon": max(info["peak_anon"], mem.get("RssAnon", 0))}
            totals[info["role"]] += mem.get("VmRSS", 0)
            if info["role"] == "coordinator":
                self.coordinator_trace.append((round(now, 2), mem.get("VmRSS", 0)))
        for what, total in totals.items():
            self.role_peaks[what] = max(self.role_peaks[what], total)
        self.samples += 1

    def summary(self) -> dict[str, Any]:
        """Peak bytes per role: the largest single process and the largest sampled sum."""
        by_role: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for info in self.procs.values():
            by_role[info["role"]].append(info)
        return {what: {"processes": len(infos),
                       "peak_process_bytes": max(i["peak_rss"] for i in infos),
                       "peak_process_anon_bytes": max(i["peak_anon"] for i in infos),
                       "peak_sum_bytes": self.role_peaks.get(what, 0)}
                for what, infos in sorted(by_role.items())}


def run_one(institutions: int, model: Path, args: argparse.Namespace,
            out: Path) -> dict[str, Any]:
    """Run one simulation under the sampler; return its timings and memory."""
    out_dir = out / f"{model.name}-institutions-{institutions}"
    cmd = [sys.executable, str(SCRIPT), "--institutions", str(institutions),
           "--model", str(model), "--trainable", args.trainable, "--partition", "iid",
           "--max-examples", str(args.examples), "--batch-size", str(args.batch_size),
           "--num-rounds", str(args.rounds), "--target-epsilon", str(args.epsilon),
           "--output-dir", str(out_dir)]
    logging.info("%d institutions: %s", institutions, " ".join(cmd[2:]))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = out / f"{model.name}-institutions-{institutions}.log"
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        sampler = Sampler(proc.pid, args.interval)
        sampler.start()
        try:
            code = proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # run_simulation stops its SuperLink on SIGTERM
            proc.wait(60)
            raise SystemExit(f"{institutions} institutions: no result in {args.timeout} s; "
                             f"see {log_path}") from None
        finally:
            sampler.stop()
        wall = time.monotonic() - started
    if code != 0:
        tail = log_path.read_text("utf-8", "replace")[-3000:]
        raise SystemExit(f"{institutions} institutions: exit {code}:\n{tail}")
    metrics = json.loads((out_dir / "metrics.json").read_text("utf-8"))
    trained = metrics["rounds"][1:]
    eps = [s["epsilon"] for s in trained[-1]["institutions"].values()]
    memory = sampler.summary()
    result = {"institutions": institutions, "wall_seconds": wall,
              "round_seconds": [r["seconds"] for r in trained],
              "aggregated": [len(r["institutions"]) for r in trained],
              "failures": sum(len(r.get("failures") or []) for r in trained),
              "max_epsilon": max(e for e in eps if e is not None) if any(eps) else None,
              "accuracy": (trained[-1]["centralized_eval"] or {}).get("accuracy"),
              "bytes_received_per_round": [r["bytes_received"] for r in trained],
              "memory": memory, "samples": sampler.samples,
              "processes": sorted(({"role": i["role"], "name": i["name"],
                                    "peak_bytes": i["peak_rss"]}
                                   for i in sampler.procs.values()),
                                  key=lambda i: -i["peak_bytes"]),
              "coordinator_trace": sampler.coordinator_trace}
    coordinator = memory.get("coordinator", {})
    actors = memory.get("ray-actor", {})
    logging.info("%d institutions: %.0f s, coordinator peak %.0f MiB, largest actor %.0f MiB "
                 "(%d actors)", institutions, wall,
                 coordinator.get("peak_process_bytes", 0) / MIB,
                 actors.get("peak_process_bytes", 0) / MIB, actors.get("processes", 0))
    return result


def _rows(model: dict[str, Any], results: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows of one model; adds the growth figures to ``results``."""
    size = model["model_bytes"]
    base = results[0]
    base_peak = base["memory"]["coordinator"]["peak_process_bytes"]
    rows = []
    for r in results:
        coord = r["memory"]["coordinator"]["peak_process_bytes"]
        actors = r["memory"].get("ray-actor", {})
        link = r["memory"].get("superlink", {}).get("peak_process_bytes", 0)
        added = r["institutions"] - base["institutions"]
        growth = (coord - base_peak) / size
        r |= {"coordinator_over_model": coord / size, "growth_in_models": growth,
              "growth_models_per_added_institution": growth / added if added else None}
        rows.append([f"{model['parameters'] / 1e6:.2f} M ({size / MIB:.1f} MiB)",
                     r["institutions"], f"{r['wall_seconds']:.0f}",
                     " / ".join(f"{s:.0f}" for s in r["round_seconds"]),
                     f"{coord / MIB:.0f}", f"{coord / size:.0f}×",
                     f"{growth:+.1f}" + (f" ({growth / added:.2f} per institution)"
                                         if added else ""),
                     f"{actors.get('processes', 0)} × "
                     f"{actors.get('peak_process_bytes', 0) / MIB:.0f}", f"{link / MIB:.0f}"])
    return rows


def main() -> None:
    """Measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--institutions", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=32,
                        help="training examples per institution (--max-examples)")
    parser.add_argument("--batch-size", type=int, default=8, help="expected Poisson batch")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32],
                        help="tiny BERT hidden size(s); each is one model size")
    parser.add_argument("--layers", type=int, default=2, help="tiny BERT layers")
    parser.add_argument("--trainable", default="all", help="what trains and travels")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the model, outputs and logs here (default: a temp folder)")
    parser.add_argument("--name", default="sim_scale", help="results file name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    labels = LabelMap.from_names(icd10_label_names())
    models: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-scale-") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        for hidden in args.hidden:
            folder = tiny_bert(root / f"bert-h{hidden}-l{args.layers}", labels, hidden,
                               args.layers)
            model = load_model(ModelConfig(model=str(folder), trainable=args.trainable),
                               labels, seed=0)
            entry: dict[str, Any] = {
                "hidden": hidden, "layers": args.layers,
                "parameters": sum(p.numel() for p in model.parameters()),
                "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "update_bytes": sum(p.numel() * p.element_size()
                                    for p in model.parameters() if p.requires_grad)}
            del model
            logging.info("tiny BERT h%d: %d parameters, %.2f MiB; update %.2f MiB", hidden,
                         entry["parameters"], entry["model_bytes"] / MIB,
                         entry["update_bytes"] / MIB)
            entry["results"] = [run_one(n, folder, args, root) for n in args.institutions]
            rows += _rows(entry, entry["results"])
            models.append(entry)
    first = args.institutions[0]
    table = markdown(["model (fp32)", "institutions", "wall s", "round s",
                      "coordinator peak MiB", "÷ model", f"growth vs {first} (model sizes)",
                      "Ray actors × peak MiB", "SuperLink MiB"], rows)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write(args.name, {"settings": settings, "models": models}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
