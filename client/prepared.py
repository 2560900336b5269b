"""An institution's data made ready once per process: loaded, fingerprinted, scrubbed, tokenised."""

from __future__ import annotations

import functools
from pathlib import Path

from torch.utils.data import TensorDataset

from fedsilo.client import budget
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.deidentify import DeidSettings, scrubber_for
from fedsilo.common.model import load_tokenizer
from fedsilo.common.splits import (
    InstitutionData,
    deidentified,
    local_institution,
    simulated_institution,
)
from fedsilo.common.task import federation_labels
from fedsilo.common.token_cache import encode_cached


def stamp(data: str) -> tuple[int, int] | None:
    """Modification time and size of a data file (None for the built-in dataset)."""
    try:
        stat = Path(data).expanduser().stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def prepared_data(
    cfg: FedsiloConfig, partition: tuple[int, int] | None, name: str, cache: Path,
    stamp: tuple[int, int] | None, deid: DeidSettings,
) -> tuple[InstitutionData, TensorDataset, TensorDataset, str, dict[str, object]]:
    """Load, fingerprint, de-identify and tokenise (through the on-disk caches) once per process.

    ``stamp`` (:func:`stamp`) is part of the key: a long-lived process (the
    runtime) reloads a data file that changed between messages. The fingerprint (the
    ledger's key) is taken on the raw records before any split, so neither the split
    nor scrubbing changes the budget; everything after it (tokens, features,
    evaluation) sees only scrubbed text.
    """
    if partition is not None:
        data = simulated_institution(cfg.data, cfg.train.seed, *partition)
    else:
        data = local_institution(cfg.data, name, cfg.train.seed)
    fingerprint = budget.raw_fingerprint(cfg, partition, data)
    data, report = deidentified(data, scrubber_for(deid), cache)
    labels = federation_labels(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_set = encode_cached(cache, tokenizer, data.train, labels, cfg.model.max_length)
    test_set = encode_cached(cache, tokenizer, data.test, labels, cfg.model.max_length)
    summary = {"kinds": list(deid.kinds), "patterns": [p.name for p in deid.patterns],
               "files": report.as_dict()}
    return data, train_set, test_set, fingerprint, summary
