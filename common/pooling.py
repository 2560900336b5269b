"""A BERT sequence classifier that reads the mean of its tokens' final hidden states.

Sentence-transformers checkpoints such as the default all-MiniLM-L6-v2 are trained to
be read through mean pooling; their first-token state and BERT pooler are not what
they were tuned for. This model is Hugging Face's ``BertForSequenceClassification``
with the pooler dropped and the linear classifier fed the attention-masked mean of
the last hidden states.

This file must import only ``torch`` and ``transformers``: ``save_pretrained``
copies it beside a saved model, so that ``pipeline("text-classification",
model=folder, trust_remote_code=True)`` loads the model anywhere, without fedsilo.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "fedsilo_mean_bert"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch, tokens, dim) over the tokens ``attention_mask`` keeps."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MeanPoolBertConfig(BertConfig):
    """A :class:`~transformers.BertConfig` whose classifier reads mean-pooled tokens."""

    model_type = MODEL_TYPE


class MeanPoolBertForSequenceClassification(BertForSequenceClassification):
    """BERT encoder (no pooler) → masked mean of the last hidden states → dropout → linear."""

    config_class = MeanPoolBertConfig

    def __init__(self, config: MeanPoolBertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> SequenceClassifierOutput:
        """Logits (and the cross-entropy loss when ``labels`` are given) for one batch."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        limit = getattr(self.config, "fedsilo_max_length", None)  # the trained length
        if limit and input_ids is not None and input_ids.shape[1] > limit:
            # cut as the tokenizer would: the first limit - 1 tokens and the closing one
            cut = attention_mask[:, limit:].any(dim=1)
            last = attention_mask.sum(1) - 1  # right padding: each row's final token
            ids = input_ids[:, :limit].clone()
            ids[cut, limit - 1] = input_ids[cut, last[cut]]
            input_ids, attention_mask = ids, attention_mask[:, :limit]
            token_type_ids = None if token_type_ids is None else token_type_ids[:, :limit]
            position_ids = None if position_ids is None else position_ids[:, :limit]
        hidden = self.bert(input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids, position_ids=position_ids,
                           return_dict=True).last_hidden_state
        logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, MeanPoolBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    MeanPoolBertConfig, MeanPoolBertForSequenceClassification, exist_ok=True)
MeanPoolBertConfig.register_for_auto_class()
MeanPoolBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
