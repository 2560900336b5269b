"""On-disk cache of tokenised datasets, keyed by the data, the tokenizer and max length.

Flower starts a new ClientApp process for every message, so without a cache every
round re-tokenises the institution's data. The cache lives on the institution's own
disk (beside its ledger; in a simulation, in the output folder); a change of the
records, their order, the label map, the tokenizer or ``max-length`` gives a new key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from fedsilo.common.records import LabelMap, TextRecords
from fedsilo.common.task import encode
from fedsilo.common.tensor_files import load_tensors, save_tensors


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the tokenizer's full specification (vocabulary, normaliser, settings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        doc = json.loads(backend.to_str())
        for per_call in ("truncation", "padding"):  # set by each call, not the tokenizer
            doc.pop(per_call, None)
        spec = json.dumps(doc, sort_keys=True)
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(type(tokenizer).__name__.encode("utf-8"))
    digest.update(spec.encode("utf-8"))
    return digest.hexdigest()


def cache_key(records: TextRecords, labels: LabelMap, tokenizer: PreTrainedTokenizerBase,
              max_length: int) -> str:
    """Key of one tokenised dataset: records in order, label map, tokenizer, max length."""
    digest = hashlib.sha256(json.dumps([tokenizer_fingerprint(tokenizer), max_length,
                                        list(labels.names)]).encode("utf-8"))
    for text, label in zip(records.texts, records.labels, strict=True):
        digest.update(json.dumps([text, label]).encode("utf-8"))
    return digest.hexdigest()


def encode_cached(folder: Path | None, tokenizer: PreTrainedTokenizerBase,
                  records: TextRecords, labels: LabelMap, max_length: int) -> TensorDataset:
    """Tokenise ``records`` like :func:`~fedsilo.common.task.encode`, reusing ``folder``.

    An unreadable cache file is ignored (and replaced); the file is written atomically.
    """
    if folder is None:
        return encode(tokenizer, records, labels, max_length)
    path = folder / f"{cache_key(records, labels, tokenizer, max_length)[:40]}.pt"
    cached = load_tensors(path, "tokenisation cache")
    if cached is not None:
        return TensorDataset(*cached)
    dataset = encode(tokenizer, records, labels, max_length)
    save_tensors(path, list(dataset.tensors))
    return dataset
