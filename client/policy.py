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
  default): the run's ``deidentify-floor`` can only make it decline, never scrub less.

The noise multiplier is always calibrated locally from the effective (ε, δ), so the
coordinator cannot lower it either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedsilo.client.privacy import DeclinedError
from fedsilo.common.bounds import default_delta
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.deidentify import DeidSettings

#: Node-config keys that name the institution's data; they replace the run's values.
DATA_KEYS = ("data", "text-column", "label-column", "test-fraction", "max-examples", "device")
#: Node-config keys of the institution's privacy policy.
POLICY_KEYS = ("target-epsilon", "target-delta", "max-grad-norm", "allow-no-dp")
NAME_KEY = "institution"
#: Node-config key of the institution's de-identification settings (:meth:`DeidSettings.to_node`).
DEID_KEY = "deidentify"
#: Node-config key of the folder holding the institution's privacy ledger.
LEDGER_KEY = "ledger-dir"


class PolicyError(DeclinedError):
    """The coordinator asked for something the institution's policy forbids."""


@dataclass(frozen=True)
class Policy:
    """What the institution caps beyond the merged config.

    ``max_delta`` is the institution's δ (``0`` = its automatic δ, computed from its
    number of examples), which a run's larger δ cannot exceed.
    """

    max_delta: float = 0.0
    ledger_dir: str = ""
    deidentify: DeidSettings = field(default_factory=DeidSettings)

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
    if not run.privacy.dp and not bool(node.get("allow-no-dp", False)):
        raise PolicyError(
            "declined: the coordinator's run turns DP off, which this institution's "
            "policy does not allow (set allow-no-dp = true in client.toml to permit it)"
        )
    if run.privacy.dp and run.privacy.dp_level == "client" and not node.get("allow-no-dp"):
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
    policy = Policy(max_delta=float(node.get("target-delta", 0.0) or 0.0),
                    ledger_dir=str(node.get(LEDGER_KEY, "")), deidentify=deid)
    return run.replace(**changes), policy


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
