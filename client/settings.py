"""The schema of ``client.toml``: every institution-owned setting, its TOML type, once.

``flower-client`` reads and type-checks the file against :data:`SCHEMA` (its flags are
made from it too); the settings the run config also has (columns, split, target ε/δ,
clipping norm) are then range-checked by the federation schema
(:class:`~fedsilo.common.config.FedsiloConfig`). The ``data`` and ``policy`` groups
travel in the SuperNode's node config to the institution's ClientApp, where
:mod:`fedsilo.client.policy` applies them over the coordinator's run config. The
``[deidentify]`` table has its own schema (:class:`~fedsilo.common.deidentify.DeidSettings`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedsilo.common.config import ConfigError, FedsiloConfig

NAME_KEY = "institution"
#: The folder of the institution's privacy ledger (its approved agreements beside it).
LEDGER_KEY = "ledger-dir"
#: The node-config key of the de-identification settings (``[deidentify]`` in client.toml).
DEID_KEY = "deidentify"
#: Lifetime ε of a dataset whose institution sets no ``lifetime-epsilon``: one run at
#: the default per-run ε of 8 fits, a second one does not.
DEFAULT_LIFETIME_EPSILON = 10.0
#: σ of each noised count of a released local evaluation (``evaluation-noise``).
EVALUATION_NOISE = 20.0

Group = Literal["who", "connection", "data", "policy", "check"]
_NUMBER = (int, float)


@dataclass(frozen=True)
class Setting:
    """One key of client.toml: its group, TOML types, and whether it is a path."""

    group: Group
    kinds: tuple[type, ...]
    path: bool = False  # relative to client.toml's folder


SCHEMA: dict[str, Setting] = {
    NAME_KEY: Setting("who", (str,)),
    "superlink": Setting("connection", (str,)),
    "root-certificates": Setting("connection", (str,), path=True),
    "ca-sha256": Setting("connection", (str,)),
    "auth-private-key": Setting("connection", (str,), path=True),
    "insecure": Setting("connection", (bool,)),
    # the institution's data and its split (never the run's)
    "data": Setting("data", (str,), path=True),
    "text-column": Setting("data", (str,)),
    "label-column": Setting("data", (str,)),
    "test-fraction": Setting("data", _NUMBER),
    "max-examples": Setting("data", (int,)),
    "device": Setting("data", (str,)),
    "seed": Setting("data", (int,)),
    # its privacy policy and what it releases
    "target-epsilon": Setting("policy", _NUMBER),
    "target-delta": Setting("policy", _NUMBER),
    "max-grad-norm": Setting("policy", _NUMBER),
    "allow-no-dp": Setting("policy", (bool,)),
    "lifetime-epsilon": Setting("policy", _NUMBER),
    "dataset-id": Setting("policy", (str,)),
    "state-dir": Setting("policy", (str,), path=True),
    "release-evaluation": Setting("policy", (bool,)),
    "evaluation-noise": Setting("policy", _NUMBER),
    "declared-examples": Setting("policy", (int,)),
    LEDGER_KEY: Setting("policy", (str,), path=True),
    # checked locally before joining, not passed on
    "labels": Setting("check", (str, list)),
    "model": Setting("check", (str,)),
    "runtime-port": Setting("check", (int,)),
}


def keys(*groups: Group) -> tuple[str, ...]:
    """The keys of ``groups``, in the schema's order."""
    return tuple(k for k, s in SCHEMA.items() if s.group in groups)


#: Node-config keys that name the institution's data; they replace the run's values.
DATA_KEYS = keys("data")
#: How the institution splits its data: its own setting or the schema's default, never the run's.
SPLIT_KEYS = ("seed", "test-fraction", "max-examples")
#: Node-config keys of the institution's privacy policy (its budget and what it releases).
POLICY_KEYS = tuple(k for k in keys("policy") if k != LEDGER_KEY)
#: Keys the federation schema also has: their ranges are checked there.
SHARED_KEYS = (*DATA_KEYS, "target-epsilon", "target-delta", "max-grad-norm")
PATH_KEYS = tuple(k for k, s in SCHEMA.items() if s.path)
_NAMES = {"str": "a quoted string", "list": "a list of names", "bool": "true or false",
          "int": "a whole number", "float": "a number"}


def type_problem(key: str, value: object) -> str | None:
    """What is wrong with ``value``'s TOML type for ``key`` (None: nothing)."""
    kinds = SCHEMA[key].kinds
    if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
        return None
    names = " or ".join(_NAMES[k.__name__] for k in kinds if not (k is int and float in kinds))
    return f"'{key}' must be {names} (got {value!r:.60} of type {type(value).__name__})"


def check(settings: dict[str, Any], origin: str) -> None:
    """Type-check ``settings`` (client.toml's keys) and range-check the shared ones.

    A list of ``labels`` becomes its JSON text (as the run config holds it).

    Raises
    ------
    ConfigError
        Naming ``origin`` and the key, and how to fix it.
    """
    unknown = sorted(set(settings) - set(SCHEMA) - {DEID_KEY})
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {unknown}; known keys: "
                          f"{', '.join(SCHEMA)}")
    for key, value in settings.items():
        if key in SCHEMA and (problem := type_problem(key, value)):
            raise ConfigError(f"{origin}: {problem}; fix it in client.toml")
    if isinstance(settings.get("labels"), list):
        settings["labels"] = json.dumps([str(n) for n in settings["labels"]])
    FedsiloConfig.from_flat({k: settings[k] for k in SHARED_KEYS if k in settings},
                            origin=origin)


def node_value(node: Mapping[str, object], key: str, default: object) -> object:
    """A policy value of the node config, type-checked like client.toml's.

    Raises
    ------
    ConfigError
        Naming the key and client.toml.
    """
    value = node.get(key, default)
    if (problem := type_problem(key, value)) is not None:
        raise ConfigError(f"node config: {problem}; fix it in client.toml")
    return value
