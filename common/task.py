"""Shared task pieces: the federation's label map, tokenisation and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from fedsilo.common.config import FedsiloConfig
from fedsilo.common.features import logits
from fedsilo.common.metrics import accuracy, macro_f1
from fedsilo.common.records import LabelMap, TextRecords, icd10_label_names, load_records


def federation_labels(cfg: FedsiloConfig) -> LabelMap:
    """Return the label map every institution and the coordinator agree on.

    ``--labels`` wins; otherwise the built-in dataset's classes, or (when the data
    file is at hand, as in a simulation) the sorted labels found in it.
    """
    if cfg.data.labels:
        return LabelMap.from_names(cfg.data.labels)
    if cfg.data.data == "icd10":
        return LabelMap.from_names(icd10_label_names())
    records = load_records(cfg.data.data, cfg.data.text_column, cfg.data.label_column)
    return LabelMap.from_names(sorted(set(records.labels)))


def freeze_labels(cfg: FedsiloConfig) -> FedsiloConfig:
    """Write the federation's label map into the config, so every party uses it as is."""
    return cfg.replace(labels=json.dumps(list(federation_labels(cfg).names)))


def encode(
    tokenizer: PreTrainedTokenizerBase,
    records: TextRecords,
    labels: LabelMap,
    max_length: int,
) -> TensorDataset:
    """Tokenise ``records`` into ``(input_ids, attention_mask, label)`` tensors.

    Texts are padded to the longest one (at most ``max_length`` tokens) so batches
    have one fixed shape, as Opacus's Poisson loader expects.
    """
    y = labels.encode(records.labels, records.source)
    enc = tokenizer(
        list(records.texts),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return TensorDataset(
        enc["input_ids"], enc["attention_mask"], torch.as_tensor(y, dtype=torch.long)
    )


@dataclass(frozen=True)
class EvalResult:
    """Held-out metrics of one model on one dataset."""

    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: TensorDataset, device: torch.device, batch_size: int = 256
) -> EvalResult:
    """Compute mean cross-entropy, accuracy and macro-F1 of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    total_loss, preds, golds = 0.0, [], []
    for *inputs, y in DataLoader(dataset, batch_size=batch_size):
        with torch.inference_mode():
            out = logits(model, *(x.to(device) for x in inputs))
        y = y.to(device)
        total_loss += float(F.cross_entropy(out, y, reduction="sum"))
        preds.append(out.argmax(-1).cpu().numpy())
        golds.append(y.cpu().numpy())
    model.train(was_training)
    y_true, y_pred = np.concatenate(golds), np.concatenate(preds)
    return EvalResult(
        loss=total_loss / len(y_true),
        accuracy=accuracy(y_true, y_pred),
        macro_f1=macro_f1(y_true, y_pred),
        num_examples=len(y_true),
    )
