"""Frozen-encoder features: when only the head trains, run the encoder once per dataset.

With ``--trainable classifier`` (the default) every encoder weight is frozen and never
travels, so the encoder's output for an example is the same in every round. The
head of the BERT and RoBERTa families reads only the first token's final hidden
state, and a mean-pooling classifier (:mod:`fedsilo.common.pooling`) only the
masked mean of all tokens' states, so that vector (computed once in eval mode,
without dropout, as at prediction time) is all training and evaluation need. They
then run the head alone: DP-SGD clips and noises the head's per-example gradients
exactly as before, on inputs that are a fixed function of each record, so the
guarantee is unchanged.

Features are cached on the institution's disk beside the tokenisation cache, keyed
by the tokenised tensors and the frozen weights. A head this module does not know,
or one whose logits from features differ from the full forward pass, falls back to
the full model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.common.model import encoder_kwargs, forward_logits, trainable_names
from fedsilo.common.pooling import MeanPoolBertForSequenceClassification, mean_pool
from fedsilo.common.tensor_files import load_tensors, save_tensors

log = logging.getLogger(__name__)

#: Largest difference between head-on-features and full-model logits that is accepted.
TOLERANCE = 1e-4
_BATCH = 256


class Head(nn.Module):
    """The classification head of a sequence classifier, fed its pooled features.

    Its parameters are the classifier's own (shared, not copied): training the head
    trains the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        pooler = getattr(model.base_model, "pooler", None)
        self.mean = isinstance(model, MeanPoolBertForSequenceClassification)
        if self.mean:
            self.pooler, self.dropout = None, model.dropout  # mean → dropout → linear
        elif pooler is not None and isinstance(getattr(model, "classifier", None), nn.Linear):
            self.pooler: nn.Module | None = pooler  # BERT family: pooler → dropout → linear
            self.dropout: nn.Module = getattr(model, "dropout", nn.Identity())
        elif hasattr(getattr(model, "classifier", None), "out_proj"):
            self.pooler, self.dropout = None, nn.Identity()  # RoBERTa family: one module
        else:
            raise TypeError(f"{type(model).__name__} has no known first-token head")
        self.classifier = model.classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of pooled hidden states, shape ``(batch, hidden)``."""
        if self.mean:
            return self.classifier(self.dropout(features))
        states = features[:, None, :]  # the heads index token 0 of (batch, tokens, hidden)
        if self.pooler is None:
            return self.classifier(states)
        return self.classifier(self.dropout(self.pooler(states)))


def logits(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` (a :class:`Head`, or a full classifier) for one batch."""
    if isinstance(getattr(model, "_module", model), Head):
        return model(*inputs)
    return forward_logits(model, *inputs)


def head_only(model: nn.Module) -> Head | None:
    """The model's :class:`Head` when exactly its parameters train, else None."""
    try:
        head = Head(model)
    except TypeError:
        return None
    own = {id(p) for p in head.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return head if trainable and trainable == own else None


def frozen_digest(model: nn.Module) -> str:
    """SHA-256 of the model's architecture and every frozen tensor (what features depend on)."""
    digest = hashlib.sha256(repr(model.config.to_diff_dict()).encode("utf-8"))
    trainable = set(trainable_names(model))
    for name, tensor in model.state_dict().items():
        if name not in trainable:
            digest.update(name.encode("utf-8"))
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def extract(model: nn.Module, tokens: TensorDataset, device: torch.device) -> TensorDataset:
    """Pooled final hidden states of ``(input_ids, mask, label)`` → ``(features, label)``.

    The first token's state, or the masked mean of all tokens' for a mean-pooling model.
    """
    was_training = model.training
    model.eval()
    out = []
    mean = isinstance(model, MeanPoolBertForSequenceClassification)
    for input_ids, mask, _ in DataLoader(tokens, batch_size=_BATCH):
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask,
                                  **encoder_kwargs(model, input_ids, mask))
        states = hidden.last_hidden_state
        pooled = mean_pool(states, mask) if mean else states[:, 0]
        out.append(pooled.float().cpu())
    model.train(was_training)
    hidden_size = int(model.config.hidden_size)
    features = torch.cat(out) if out else torch.empty(0, hidden_size)
    return TensorDataset(features, tokens.tensors[2])


@torch.inference_mode()
def agrees(model: nn.Module, head: Head, tokens: TensorDataset, features: TensorDataset,
           device: torch.device, sample: int = 8) -> bool:
    """Whether the head on features reproduces the full model's logits (eval mode)."""
    if not len(tokens):
        return True
    was_training = model.training
    model.eval()
    input_ids, mask, _ = tokens[:sample]
    full = forward_logits(model, input_ids.to(device), mask.to(device))
    fast = head(features.tensors[0][:sample].to(device))
    model.train(was_training)
    return bool(torch.allclose(full, fast, atol=TOLERANCE, rtol=0))


def _tokens_digest(tokens: TensorDataset) -> str:
    digest = hashlib.sha256()
    for tensor in tokens.tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode("utf-8"))
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def features_cached(folder: Path | None, model: nn.Module, model_digest: str,
                    tokens: TensorDataset, device: torch.device) -> TensorDataset:
    """:func:`extract`, reusing (and atomically writing) ``folder/features-<key>.pt``.

    The key covers the tokenised tensors (records, labels, tokenizer, max length) and
    ``model_digest`` (:func:`frozen_digest`); an unreadable file is recomputed.
    """
    if folder is None:
        return extract(model, tokens, device)
    key = hashlib.sha256(f"{model_digest}:{_tokens_digest(tokens)}".encode()).hexdigest()
    path = folder / f"features-{key[:40]}.pt"
    cached = load_tensors(path, "feature cache")
    if cached is not None:
        return TensorDataset(*cached)
    features = extract(model, tokens, device)
    save_tensors(path, list(features.tensors))
    return features


def prepare(model: nn.Module, datasets: list[TensorDataset], device: torch.device,
            folder: Path | None) -> tuple[nn.Module, list[TensorDataset]]:
    """The module to train and evaluate, and its inputs for each tokenised dataset.

    The model's :class:`Head` on cached pooled features when only the head
    trains and it reproduces the full model's logits; otherwise the model itself on
    the tokens. ``model`` is moved to ``device``.
    """
    model.to(device)
    head = head_only(model)
    if head is None:
        return model, datasets
    digest = frozen_digest(model)
    features = [features_cached(folder, model, digest, d, device) for d in datasets]
    checked = [(t, f) for t, f in zip(datasets, features, strict=True) if len(t)]
    if checked and not agrees(model, head, *checked[0], device):
        log.warning("%s: the head on cached encoder features does not reproduce the full "
                    "model's logits; running the whole model every step instead",
                    type(model).__name__)
        return model, datasets
    return head, features
