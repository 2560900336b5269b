"""Write the final global model as a Hugging Face folder, atomically."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsilo.common.atomic import swap_folder
from fedsilo.common.lora import merge_lora


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path
) -> None:
    """Save ``model`` and ``tokenizer`` to ``target`` so ``pipeline`` can load it.

    The folder is written beside ``target`` and swapped in only when complete, so an
    interrupted save never leaves a half-written model where one is expected.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        merge_lora(model)  # adapters folded into their base weights: a plain checkpoint
        for param in model.parameters():
            param.requires_grad_(True)  # a plain checkpoint: every tensor trainable again
        model.to("cpu").save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        swap_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
