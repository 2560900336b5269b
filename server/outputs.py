"""Write the final global model as a Hugging Face folder, atomically."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsilo.common.atomic import swap_folder
from fedsilo.common.lora import merge_lora

#: Config attribute holding the number of tokens the model was trained on.
LENGTH_KEY = "fedsilo_max_length"


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path,
    max_length: int | None = None,
) -> None:
    """Save ``model`` and ``tokenizer`` to ``target`` so ``pipeline`` can load it.

    ``max_length`` (the run's ``--max-length``) travels with the model: as the
    tokenizer's ``model_max_length`` (``truncation=True`` cuts there) and as the
    config's ``fedsilo_max_length`` (the mean-pooling model cuts longer input itself,
    so ``pipeline(...)`` needs no ``truncation`` argument). The folder is written
    beside ``target`` and swapped in only when complete, so an interrupted save never
    leaves a half-written model where one is expected.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        merge_lora(model)  # adapters folded into their base weights: a plain checkpoint
        for param in model.parameters():
            param.requires_grad_(True)  # a plain checkpoint: every tensor trainable again
        before = tokenizer.model_max_length
        if max_length is not None:
            setattr(model.config, LENGTH_KEY, max_length)
            tokenizer.model_max_length = max_length
        try:
            model.to("cpu").save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        finally:
            tokenizer.model_max_length = before
        swap_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
