"""Command-line flags by role, from the one configuration schema (:mod:`fedsilo.common.config`).

Each command shows only the settings of its role: ``flower-server`` hides how a
simulation splits one machine's data, the simulation script hides what only the
coordinator sets.
"""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any, Literal

from fedsilo.common.config import SECTIONS

#: Settings only a simulation's command offers: how one machine's data becomes virtual
#: institutions and the coordinator's holdout. A deployed institution's data and split
#: are its own (client.toml), so ``flower-server`` has no flag for them.
SIMULATION_ONLY = frozenset({"data", "partition", "dirichlet-alpha", "partition-column",
                             "test-fraction", "holdout-fraction"})
#: Settings only ``flower-server`` sets (``agreement-id`` comes from ``--agreement``).
COORDINATOR_ONLY = frozenset({"agreement-id"})
ROLE_HIDES = {"coordinator": SIMULATION_ONLY, "simulation": COORDINATOR_ONLY}


def add_config_arguments(parser: argparse.ArgumentParser, sections: list[str],
                         role: Literal["coordinator", "simulation"]) -> None:
    """Add one ``--flag`` per setting of the given sections that ``role`` uses.

    Flags default to ``argparse.SUPPRESS`` so that only what the user typed
    overrides the config; read them back with :func:`config_overrides`.
    """
    hidden = ROLE_HIDES[role]
    for section in sections:
        group = parser.add_argument_group(f"{section} settings")
        cls = SECTIONS[section]
        for name, field in cls.model_fields.items():
            key = name.replace("_", "-")
            if key in hidden:
                continue
            default = field.default
            shown = json.dumps(list(default)) if isinstance(default, tuple) else default
            kwargs: dict[str, Any] = {
                "dest": f"cfg__{key}",
                "default": argparse.SUPPRESS,
                # argparse expands %-formats in help: a literal "95%" must be "95%%"
                "help": f"{field.description} (default: {shown})".replace("%", "%%"),
            }
            annotation = field.annotation
            if annotation is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(annotation) is Literal:
                kwargs["choices"] = list(typing.get_args(annotation))
            elif annotation in (int, float):
                kwargs["type"] = annotation
                kwargs["metavar"] = annotation.__name__.upper()
            else:
                kwargs["metavar"] = "TEXT"
            group.add_argument(f"--{key}", **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the flat settings the user gave on the command line."""
    return {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__")}
