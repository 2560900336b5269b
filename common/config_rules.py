"""Rules across sections of the fedsilo configuration (settings that cannot go together)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsilo.common.config import FedsiloConfig

#: Strategies that need every update on its own (coordinate-wise order statistics).
ROBUST = ("median", "trimmed-mean")


def cross_check(cfg: FedsiloConfig) -> None:
    """Raise ValueError naming the flags of settings that cannot go together."""
    if cfg.federation.min_train > cfg.federation.min_available:
        raise ValueError(
            f"--min-train ({cfg.federation.min_train}) cannot exceed --min-available "
            f"({cfg.federation.min_available})"
        )
    fed, priv = cfg.federation, cfg.privacy
    if fed.strategy in ROBUST and fed.secure_aggregation:
        raise ValueError(f"--strategy {fed.strategy} cannot run with --secure-aggregation: "
                         "SecAgg+ shows the coordinator only the sum of the updates, and a "
                         "median or trimmed mean needs each one; drop one of the two flags")
    if fed.strategy in ROBUST and priv.client_level:
        raise ValueError(f"--strategy {fed.strategy} cannot run with --dp-level client: "
                         "client-level noise is calibrated to a uniform mean of clipped "
                         "updates, not to a median or trimmed mean; use --dp-level record "
                         "(each institution's DP-SGD) or --strategy fedavg")
    if fed.secure_aggregation and fed.strategy != "fedavg":
        raise ValueError("--secure-aggregation works with --strategy fedavg only "
                         f"(got --strategy {fed.strategy})")
    if fed.secure_aggregation and fed.min_train < 2:
        raise ValueError("--secure-aggregation needs --min-train 2 or more: SecAgg+ hides an "
                         "update only in a sum of several, and Flower's protocol halts with one")
    if fed.secure_aggregation and priv.client_level:
        raise ValueError("--secure-aggregation cannot be combined with --dp-level client "
                         "(Flower adds client-level noise on its newer workflow only); "
                         "use --dp-level record with SecAgg+")
    if fed.update_dtype == "float16" and fed.secure_aggregation:
        raise ValueError("--update-dtype float16 does not apply to --secure-aggregation, "
                         "which quantizes updates itself; leave it at float32")
    if (fed.update_dtype == "float16" and priv.client_level
            and priv.update_clipping == "institution"):
        raise ValueError("--update-dtype float16 after clipping at the institution could "
                         "round an update past --update-clipping-norm; use "
                         "--update-clipping coordinator or float32")
    if fed.resume and priv.client_level:
        raise ValueError("--resume is not available with --dp-level client; start a new run")
    if fed.strategy == "scaffold" and cfg.train.optimizer != "sgd":
        raise ValueError("--strategy scaffold corrects plain SGD steps: add --optimizer sgd "
                         "(and an SGD --learning-rate, e.g. 2 for the head)")
    if priv.client_level and fed.strategy != "fedavg":
        raise ValueError("--dp-level client needs --strategy fedavg (Flower's accountant "
                         "assumes a uniform average)")
