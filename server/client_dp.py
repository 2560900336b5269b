"""Client-level DP at the coordinator: Flower's fixed-clipping wrappers and accountant.

With ``dp-level = "client"`` every institution's whole update is clipped to
``update-clipping-norm`` (at the institution or at the coordinator) and the
coordinator adds Gaussian noise to the uniform average. The unit of privacy is an
institution's participation, not a record, and the coordinator itself sees the
clipped updates before noise: see docs/privacy.md.

The noise multiplier is calibrated with Flower's own RDP accountant for the whole
planned run; the same accountant reports the ε spent after every round, and its
releases go into the checkpoint, so a resumed run goes on counting from them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig

from fedsilo.common.bounds import default_delta
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.wire import UNIFORM_WEIGHT_KEY
from fedsilo.server.checkpoint import CheckpointError
from fedsilo.server.strategy_base import ReportingMixin

log = logging.getLogger(__name__)

def client_level_delta(cfg: FedsiloConfig) -> float:
    """δ of the client-level guarantee: the configured δ, else the default for n = institutions."""
    return cfg.privacy.target_delta or default_delta(cfg.federation.min_available)


def new_accountant(cfg: FedsiloConfig) -> RdpAccountant:
    """Flower's RDP accountant for this run: no sampling amplification claimed."""
    return RdpAccountant(FlowerPrivacyConfig(
        target_delta=client_level_delta(cfg),
        population_size=cfg.federation.min_available,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=cfg.privacy.target_epsilon,
    ))


def calibrate_noise(cfg: FedsiloConfig, tolerance: float = 1e-3) -> float:
    """Smallest noise multiplier whose ``num-rounds`` releases stay within target ε.

    Bisection over σ with Flower's accountant (``would_exceed`` composes the whole
    planned run on a scratch copy).
    """
    accountant = new_accountant(cfg)
    sampled, population = cfg.federation.min_train, cfg.federation.min_available

    def exceeds(sigma: float) -> bool:
        event = GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=sampled,
                                     population_size=population)
        return accountant.would_exceed(event, count=cfg.federation.num_rounds)

    low, high = 1e-2, 1.0
    while exceeds(high):
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches target-epsilon "
                             f"{cfg.privacy.target_epsilon}; raise it")
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if exceeds(mid) else (low, mid)
    return high


class _ReportingClientLevel(ReportingMixin):
    """Mixin: report replies and, after each release, the accountant's ε."""

    state_attributes = {"accountant_releases": dict}

    @property
    def accountant_releases(self) -> dict[str, np.ndarray]:
        """Flower's accountant state (every release so far) as JSON, for the checkpoint."""
        return {"json": np.array(json.dumps(self.accountant.state_dict()))}  # type: ignore[attr-defined]

    @accountant_releases.setter
    def accountant_releases(self, saved: dict[str, np.ndarray]) -> None:
        self.accountant.load_state_dict(json.loads(str(saved["json"])))  # type: ignore[attr-defined]

    def restore_checkpoint_state(self, saved: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Put back the checkpoint's state; refuse one without the accountant's releases."""
        if "accountant_releases" not in saved:
            raise CheckpointError("--resume: the checkpoint of this client-level DP run does "
                                  "not hold the accountant's releases (written by an earlier "
                                  "fedsilo), so its ε cannot go on from them; start a new run")
        super().restore_checkpoint_state(saved)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[
        ArrayRecord | None, MetricRecord | None
    ]:
        """Aggregate through Flower's DP wrapper, then record the ε it has spent."""
        result = super().aggregate_train(server_round, replies)
        spent = self.privacy_spent()  # type: ignore[attr-defined]
        self.report.record_client_level(server_round, {
            "epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
            "noise_multiplier": self.noise_multiplier,  # type: ignore[attr-defined]
            "clipping_norm": self.clipping_norm})  # type: ignore[attr-defined]
        return result


class ClientLevelInstitutionClipping(
    _ReportingClientLevel, DifferentialPrivacyClientSideFixedClipping
):
    """Client-level DP; institutions clip their own updates, the coordinator adds noise."""


class ClientLevelCoordinatorClipping(
    _ReportingClientLevel, DifferentialPrivacyServerSideFixedClipping
):
    """Client-level DP; the coordinator clips every update and adds noise."""


def build_client_level_strategy(
    cfg: FedsiloConfig, inner_options: dict[str, object], reporting: dict[str, object],
) -> Strategy:
    """Wrap a uniform FedAvg in Flower's fixed-clipping DP wrapper with an accountant."""
    fed = cfg.federation
    inner = FedAvg(**inner_options, weighted_by_key=UNIFORM_WEIGHT_KEY)
    sigma = calibrate_noise(cfg)
    wrapper = (ClientLevelInstitutionClipping if cfg.privacy.update_clipping == "institution"
               else ClientLevelCoordinatorClipping)
    log.info("client-level DP: σ=%.3f over %d rounds of %d institutions for ε=%g, δ=%g, "
             "update clipping %g at the %s", sigma, fed.num_rounds, fed.min_train,
             cfg.privacy.target_epsilon, client_level_delta(cfg),
             cfg.privacy.update_clipping_norm, cfg.privacy.update_clipping)
    return wrapper(strategy=inner, noise_multiplier=sigma,
                   clipping_norm=cfg.privacy.update_clipping_norm,
                   num_sampled_clients=fed.min_train, accountant=new_accountant(cfg),
                   **reporting)
