"""LoRA adapters (peft) injected into the classifier, and merged back for saving.

With ``--trainable lora`` every institution trains low-rank adapters on the
attention projections plus the classification head; only those tensors travel.
Adapters are injected in place (``peft.inject_adapter_in_model``), so parameter names
keep the Hugging Face layout and Opacus sees ordinary ``nn.Linear`` layers.
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

#: Marker in the names of adapter tensors.
LORA_MARK = ".lora_"


def add_lora(model: PreTrainedModel, rank: int, alpha: float, targets: tuple[str, ...]
             ) -> PreTrainedModel:
    """Inject LoRA adapters of ``rank`` into the modules named ``targets``."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=list(targets), bias="none")
    return inject_adapter_in_model(config, model)


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """Fold every adapter into its base weight and drop the adapter modules.

    The result is a plain checkpoint that ``from_pretrained`` and ``pipeline`` load.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
