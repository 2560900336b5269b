#!/usr/bin/env python3
"""Simulate a whole fedsilo federation on this machine with Flower's Simulation Engine.

Every virtual institution is a Flower SuperNode run by the Ray backend; each gets its
own share of the data (``--partition``), trains the shared classifier with Opacus
DP-SGD and sends only its clipped, noised update. The coordinator aggregates them
and writes the final Hugging Face model and ``metrics.json`` to ``--output-dir``.

The default run is the README demo: 3 institutions with Dirichlet(α=0.5) label skew
over ICD-10-CM chapters, target ε = 8 each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from fedsilo.common import lengths
from fedsilo.common.config import KEYS, ConfigError, FedsiloConfig
from fedsilo.common.config_flags import add_config_arguments
from fedsilo.common.config_flags import config_overrides as typed_overrides
from fedsilo.common.live import live_view
from fedsilo.common.logs import configure_logging
from fedsilo.common.model import ModelError, check_checkpoint, load_tokenizer, resolve_device
from fedsilo.common.partition import partition_by_column
from fedsilo.common.processes import terminate_on_sigterm
from fedsilo.common.records import DataError
from fedsilo.common.splits import simulated_institution, split_holdout
from fedsilo.common.task import federation_labels, freeze_labels
from fedsilo.server.dashboard import heartbeat, render
from fedsilo.server.launch import (
    LaunchError,
    LogFilter,
    SuperLink,
    run_to_completion,
    write_thin_app,
)
from fedsilo.server.tracking import TrackingError, check_mlflow

log = logging.getLogger("fedsilo.simulation")

# The demo caps each institution at 6,000 training examples so that the default run
# (classifier head on cached features, 24 tokens) takes minutes on a 2-core CPU. Head
# steps are cheap (rounds after the first take ~2 s), so it runs 20 rounds of 3 local
# epochs with server momentum: in the schedule sweep's replay at ε = 8 over seeds
# 42/43/44, 20 × 3 was the only schedule whose gap to centralized training stayed under
# 5 points at every seed (10 × 3, the previous default, did not; 10 × 6 and 30 × 3 were
# no better), and FedAvgM (momentum 0.5) beat plain FedAvg end to end (docs/benchmarks.md,
# utility).
DEMO_DEFAULTS = {"max-examples": 6000, "num-rounds": 20, "local-epochs": 3,
                 "strategy": "fedavgm"}


def build_parser() -> argparse.ArgumentParser:
    """All flags: simulation settings plus every fedsilo setting."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim = parser.add_argument_group("simulation settings")
    sim.add_argument("--institutions", type=int, default=None,
                     help="virtual institutions (default: 3; with --partition column, one "
                     "per distinct value of --partition-column)")
    sim.add_argument("--client-cpus", type=int, default=1,
                     help="CPU cores reserved per institution (Ray client resources)")
    sim.add_argument("--client-gpus", type=float, default=None,
                     help="GPU share per institution (default: 0.5 when CUDA is present)")
    sim.add_argument("--deidentify", action="store_true",
                     help="every institution scrubs identifiers (all pattern kinds) from its "
                     "texts before training, as deployed institutions do by default; sets "
                     "--deidentify-floor all unless given")
    sim.add_argument("--verbose", action="store_true",
                     help="echo Flower's and Ray's log lines too (always kept in run.log)")
    add_config_arguments(parser, ["model", "data", "privacy", "train", "federation"],
                         "simulation")
    length = parser._option_string_actions["--max-length"]  # the simulation also takes auto
    length.type, length.metavar = _length_flag, "N|auto"
    length.help = (f"max tokens per text, or auto (default): the shortest length that holds "
                   f"{lengths.COVERAGE:.0%}% of the training texts whole, within the model's "
                   f"limit and {lengths.MEMORY_CAP} tokens")
    return parser


def _length_flag(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor auto") from None


def count_institutions(args: argparse.Namespace) -> int:
    """``--institutions``, or with ``--partition column`` the column's distinct values."""
    given = typed_overrides(args)
    if args.institutions is not None or given.get("partition") != "column":
        return 3 if args.institutions is None else args.institutions
    data_keys = {k: v for k, v in given.items() if KEYS[k][0] == "data" or k == "seed"}
    cfg = FedsiloConfig.from_flat(data_keys, origin="command line")
    pool, _ = split_holdout(cfg.data, cfg.train.seed)
    column = cfg.data.partition_column
    names, _ = partition_by_column(pool.columns[column])
    log.info("--partition column: %d institutions, one per value of column %r (%s)",
             len(names), column, ", ".join(names))
    return len(names)


def resolve_config(args: argparse.Namespace, institutions: int | None = None) -> FedsiloConfig:
    """Merge demo defaults, the institution count and the user's flags.

    ``max-length`` stays at the schema's default when it is ``auto``; :func:`preflight`
    measures the texts and sets it. ``institutions`` defaults to :func:`count_institutions`.
    """
    institutions = count_institutions(args) if institutions is None else institutions
    flat = {**DEMO_DEFAULTS, "min-train": institutions,
            "min-available": institutions, "output-dir": "outputs/simulation"}
    given = typed_overrides(args)
    if given.get("max-length") == "auto":
        del given["max-length"]
    if args.deidentify and "deidentify-floor" not in given:
        flat["deidentify-floor"] = "all"
    flat |= given
    if "strategy" not in given and (flat.get("secure-aggregation")
                                    or (flat.get("dp", True) and flat.get("dp-level") == "client")):
        flat["strategy"] = "fedavg"  # what these need; the demo's FedAvgM is only a default
    cfg = FedsiloConfig.from_flat(flat, origin="command line")
    out = str(Path(cfg.federation.output_dir).expanduser().resolve())
    return freeze_labels(cfg.replace(output_dir=out))


def preflight(cfg: FedsiloConfig, institutions: int, auto_length: bool) -> FedsiloConfig:
    """Fail fast, before any process starts, on bad data, labels or model.

    Returns ``cfg`` with the measured ``max-length`` when ``auto_length``.
    """
    check_mlflow(cfg.federation.mlflow)
    labels = federation_labels(cfg)
    tokenizer = load_tokenizer(cfg.model)
    resolve_device(cfg.model.device)
    texts: list[str] = []
    for pid in range(institutions):
        data = simulated_institution(cfg.data, cfg.train.seed, pid, institutions)
        labels.encode(data.train.labels, data.train.source)
        texts += data.train.texts
    log.info("%d institutions, %d labels, data %s, model %s", institutions,
             labels.num_labels, cfg.data.data, cfg.model.model)
    measured = lengths.token_lengths(tokenizer, texts, cfg.train.seed)
    if auto_length:
        positions = getattr(check_checkpoint(cfg.model.model)[1], "max_position_embeddings", None)
        choice = lengths.choose_length(measured, lengths.model_limit(tokenizer, positions))
        cfg = cfg.replace(max_length=choice.length)
        log.info("--max-length auto: %s", choice.describe())
    else:
        share = lengths.truncated_share(measured, cfg.model.max_length)
        log.info("max length %d tokens: %.1f%% of the texts are truncated",
                 cfg.model.max_length, 100 * share)
    lengths.warn_if_truncated(lengths.truncated_share(measured, cfg.model.max_length),
                              cfg.model.max_length, "training texts")
    return cfg


def federation_config(institutions: int, args: argparse.Namespace) -> list[str]:
    """Simulation-engine settings for ``flwr run --federation-config``."""
    gpus = args.client_gpus
    if gpus is None:
        gpus = 0.5 if torch.cuda.is_available() else 0.0
    return [f"num-supernodes={institutions}", 'backend="ray"',
            f"client-resources-num-cpus={args.client_cpus}",
            f"client-resources-num-gpus={gpus}"]


def summarize(metrics_path: Path, target_epsilon: float) -> None:
    """Log the final held-out accuracy against the majority class and every ε."""
    doc = json.loads(metrics_path.read_text("utf-8"))
    last = doc["rounds"][-1]
    held_out = last["centralized_eval"] or last["federated_eval"]
    if held_out:
        majority = doc["holdout_majority_rate"]
        ratio = f" = {held_out['accuracy'] / majority:.2f}× the majority-class rate " \
                f"{majority:.3f}" if majority else ""
        log.info("final held-out accuracy %.3f%s, macro-F1 %.3f", held_out["accuracy"],
                 ratio, held_out["macro_f1"])
    client_level = last.get("client_level_dp")
    if client_level:
        log.info("client-level DP (Flower's accountant): ε = %.4f at δ = %g after %d releases "
                 "(target %s); no record-level DP at the institutions",
                 client_level["epsilon"], client_level["delta"], client_level["releases"],
                 target_epsilon)
        return
    spent: dict[str, float | None] = {}
    for entry in doc["rounds"]:
        spent |= {n: s["epsilon"] for n, s in entry["institutions"].items()}
    for name, eps in sorted(spent.items()):
        shown = "DP off" if eps is None else f"ε = {eps:.4f} (target {target_epsilon})"
        log.info("%s: %s", name, shown)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation; return the process exit code."""
    configure_logging()
    terminate_on_sigterm()
    args = build_parser().parse_args(argv)
    try:
        institutions = count_institutions(args)
        if institutions < 1:
            raise ConfigError("--institutions must be at least 1")
        cfg = resolve_config(args, institutions)
        auto = typed_overrides(args).get("max-length", "auto") == "auto"
        cfg = preflight(cfg, institutions, auto)
    except (ConfigError, DataError, ModelError, TrackingError, ValueError) as err:
        log.error("%s", err)
        return 2
    with tempfile.TemporaryDirectory(prefix="fedsilo-sim-") as tmp:
        link = SuperLink(home=Path(tmp) / "flwr-home",
                         args=["--insecure", "--simulation",
                               "--disable-runtime-dependency-installation"])
        try:
            link.start()
            app_dir = write_thin_app(Path(tmp) / "app", cfg)
            sink = LogFilter(Path(cfg.federation.output_dir) / "run.log", args.verbose)
            try:
                out = Path(cfg.federation.output_dir)
                with live_view(lambda: render(out), heartbeat=lambda: heartbeat(out)):
                    run_to_completion(link, app_dir, sink,
                                      federation_config(institutions, args))
            finally:
                sink.close()
        except LaunchError as err:
            log.error("%s", err)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            link.stop()
    out = Path(cfg.federation.output_dir)
    summarize(out / "metrics.json", cfg.privacy.target_epsilon)
    log.info("done: model in %s, metrics in %s", out / "model", out / "metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
