"""An institution's own settings win over the coordinator's: data and privacy policy.

In a deployment each institution's SuperNode carries node config (written by
``flower-client``) with where its data is and its privacy policy. The run config
comes from the coordinator. This module merges the two so that nothing the
coordinator sends can loosen the institution's policy:

- data location and columns are the institution's;
- the effective target ε is the smaller of the two, and so is δ (the institution's
  δ defaults to ``min(1e-5, 0.1/n)``);
- the clipping norm is the institution's when it sets one;
- record-level DP stays on unless the institution itself allows it off
  (``allow-no-dp``, which also admits client-level-DP runs);
- de-identification is the institution's (``deidentify``; all pattern kinds by
  default): the run's ``deidentify-floor`` can only make it decline, never scrub less;
- the split of its data (``seed``, ``test-fraction``, ``max-examples``) is the
  institution's alone: set in client.toml, or the schema's defaults (42, 0.1, 0 = all),
  never the run's; a run that sends other values is logged and its values ignored;
- the record count it releases (``declared-examples``): every value of a train reply that
  would follow the exact count (``num-examples``, the sample rate, σ, the steps, the
  automatic δ, the update's scale) follows the declared count instead;
- its budget: ``lifetime-epsilon`` per dataset (default :data:`DEFAULT_LIFETIME_EPSILON`),
  the ledger's key ``dataset-id`` (default: the raw records' fingerprint) and the
  ``state-dir`` holding the ledger's markers.

The noise multiplier is always calibrated locally from the effective (ε, δ), so the
coordinator cannot lower it either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedsilo.client.privacy import DeclinedError
from fedsilo.client.settings import (
    DATA_KEYS,
    DEFAULT_LIFETIME_EPSILON,
    DEID_KEY,
    EVALUATION_NOISE,
    LEDGER_KEY,
    NAME_KEY,
    POLICY_KEYS,
    SPLIT_KEYS,
    node_value,
)
from fedsilo.common.bounds import default_delta
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.deidentify import DeidSettings

log = logging.getLogger(__name__)

class PolicyError(DeclinedError):
    """The coordinator asked for something the institution's policy forbids."""


@dataclass(frozen=True)
class Policy:
    """What the institution caps beyond the merged config.

    ``max_delta`` is the institution's δ (``0`` = its automatic δ, computed from its
    number of examples), which a run's larger δ cannot exceed. ``lifetime_epsilon``
    bounds each dataset's spend over all runs (unbounded only for a simulation's
    virtual institutions, whose ledgers last one run).
    """

    max_delta: float = 0.0
    ledger_dir: str = ""
    deidentify: DeidSettings = field(default_factory=DeidSettings)
    lifetime_epsilon: float = math.inf
    dataset_id: str = ""
    state_dir: str = ""
    #: What local evaluation releases: "none", "noised" (``release-evaluation = true``)
    #: or, for a simulation's virtual institutions only, "exact" (:func:`evaluation_release`).
    evaluation: str = "none"
    evaluation_noise: float = EVALUATION_NOISE
    #: The record count the institution releases in place of its exact one (0: exact).
    declared_examples: int = 0

    def released_count(self, num_examples: int) -> int:
        """The count every released value follows: the declared one, else the exact one.

        Privacy does not depend on it (Poisson sampling at the planned rate is what the
        accountant counts); utility does, so a count far from the data is logged here.
        """
        if not self.declared_examples:
            return num_examples
        if abs(num_examples - self.declared_examples) > 0.2 * self.declared_examples:
            log.warning("declared-examples = %d, but the training split has %d records: "
                        "updates are scaled by about %.2f; set declared-examples closer to "
                        "the data in client.toml", self.declared_examples, num_examples,
                        num_examples / self.declared_examples)
        return self.declared_examples

    def delta(self, requested: float, num_examples: int) -> float:
        """Effective δ: the run's (or automatic) δ, never above the institution's."""
        auto = default_delta(num_examples)
        return min(requested or auto, self.max_delta or auto)


def institution_config(
    run: FedsiloConfig, node: Mapping[str, object]
) -> tuple[FedsiloConfig, Policy]:
    """Apply the institution's node config on top of the coordinator's run config.

    Raises
    ------
    PolicyError
        If the run turns DP off and the institution does not allow it.
    ConfigError
        If a node-config value is invalid.
    """
    unknown = (set(node) - set(DATA_KEYS) - set(POLICY_KEYS)
               - {NAME_KEY, LEDGER_KEY, DEID_KEY})  # the last is set by flower-client
    if unknown:
        raise ConfigError(f"node config: unknown setting(s) {sorted(unknown)}")
    if NAME_KEY not in node or "data" not in node:
        raise PolicyError(
            "this SuperNode's node config names no institution or data file; start it with "
            "`flower-client --config client.toml`, which passes both"
        )
    changes: dict[str, object] = {k: node[k] for k in DATA_KEYS if k in node}
    changes |= _split(run, node)
    if not run.privacy.dp and not bool(node.get("allow-no-dp", False)):
        raise PolicyError(
            "declined: the coordinator's run turns DP off, which this institution's "
            "policy does not allow (set allow-no-dp = true in client.toml to permit it)"
        )
    if run.privacy.client_level and not node.get("allow-no-dp"):
        raise PolicyError(
            "declined: the coordinator's run uses client-level DP, so this institution's "
            "update would leave without record-level noise (the coordinator adds noise "
            "after aggregation); set allow-no-dp = true in client.toml to permit it"
        )
    if "target-epsilon" in node:
        changes["target-epsilon"] = min(float(node["target-epsilon"]),
                                        run.privacy.target_epsilon)
    if "max-grad-norm" in node:
        changes["max-grad-norm"] = float(node["max-grad-norm"])
    # A deployment's institution holds only its own data: no simulation holdout.
    changes["holdout-fraction"] = 0.0
    deid = DeidSettings.from_node(str(node[DEID_KEY])) if DEID_KEY in node else DeidSettings()
    check_deidentify_floor(run, deid)
    policy = Policy(max_delta=float(node_value(node, "target-delta", 0.0) or 0.0),
                    ledger_dir=str(node.get(LEDGER_KEY, "")), deidentify=deid,
                    lifetime_epsilon=float(node_value(node, "lifetime-epsilon",
                                                      DEFAULT_LIFETIME_EPSILON)),
                    dataset_id=str(node.get("dataset-id", "")),
                    state_dir=str(node.get("state-dir", "")),
                    evaluation=evaluation_release(node, simulated=False),
                    evaluation_noise=float(node_value(node, "evaluation-noise",
                                                      EVALUATION_NOISE)),
                    declared_examples=_declared(node))
    if not policy.lifetime_epsilon > 0:
        raise ConfigError("node config: lifetime-epsilon must be > 0; fix it in client.toml")
    return run.replace(**changes), policy


def _declared(node: Mapping[str, object]) -> int:
    """``declared-examples`` of the node config: a whole number ≥ 1, or 0 when unset."""
    value = int(node_value(node, "declared-examples", 0))  # type: ignore[call-overload]
    if value < 0:
        raise ConfigError(f"declared-examples = {value} in client.toml: use a whole number "
                          "of records (≥ 1), or leave it out to release the exact count")
    return value


def _split(run: FedsiloConfig, node: Mapping[str, object]) -> dict[str, object]:
    """The institution's split settings; the run's are ignored (logged when they differ)."""
    flat, default = run.to_flat(), FedsiloConfig().to_flat()
    out = {k: node.get(k, default[k]) for k in SPLIT_KEYS}
    for key, value in out.items():
        if flat[key] != value:
            log.info("the run asks for %s=%s; ignored: this institution splits its data with "
                     "%s=%s (its client.toml, or the default)", key, flat[key], key, value)
    return out


def evaluation_release(node: Mapping[str, object], simulated: bool) -> str:
    """What local evaluation releases for this node config.

    ``noised`` with ``release-evaluation = true``, else ``none``; a simulation's virtual
    institution (one trust domain, no ``release-evaluation`` in its node config) releases
    ``exact`` metrics.
    """
    if "release-evaluation" not in node:
        return "exact" if simulated else "none"
    value = node["release-evaluation"]
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in ("true", "false"):
        return "noised" if value is True or text == "true" else "none"
    raise ConfigError(f"release-evaluation = {value!r} in client.toml: use true or false")


def check_deidentify_floor(run: FedsiloConfig, deid: DeidSettings) -> None:
    """Decline a run whose ``deidentify-floor`` asks for kinds this institution does not scrub.

    Raises
    ------
    PolicyError
        Naming the missing kinds (terms of the run, not anything about the data).
    """
    missing = deid.missing(run.privacy.deidentify_floor)
    if missing:
        raise PolicyError(
            f"declined: the run's deidentify-floor requires scrubbing {', '.join(missing)}, "
            "which this institution's de-identification settings do not include (add them to "
            "kinds in the [deidentify] table of client.toml to join)")
