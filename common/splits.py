"""Which examples each party holds: an institution's train/test split and the holdout.

In a simulation every virtual institution loads the same source and takes its own
share, deterministically from the seed; a share of the data (the holdout) goes to no
institution and serves the coordinator's centralized evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsilo.common.config import DataConfig
from fedsilo.common.deidentify import Report, Scrubber
from fedsilo.common.partition import partition_by_column, partition_dirichlet, partition_iid
from fedsilo.common.records import DataError, TextRecords, load_records, train_test_split


@dataclass(frozen=True)
class InstitutionData:
    """An institution's name and its local training and held-out records."""

    name: str
    train: TextRecords
    test: TextRecords


def take(records: TextRecords, idx: np.ndarray) -> TextRecords:
    """Return the records at positions ``idx``."""
    pick = [int(i) for i in idx]
    return TextRecords(
        texts=[records.texts[i] for i in pick],
        labels=[records.labels[i] for i in pick],
        columns={k: [v[i] for i in pick] for k, v in records.columns.items()},
        source=records.source,
    )


@functools.lru_cache(maxsize=4)
def _load(cfg: DataConfig) -> TextRecords:
    """The simulation's source, read once per process (it does not change during a run)."""
    return _read(cfg)


def _read(cfg: DataConfig) -> TextRecords:
    extra = (cfg.partition_column,) if cfg.partition == "column" else ()
    return load_records(cfg.data, cfg.text_column, cfg.label_column, extra)


def _label_ids(records: TextRecords) -> np.ndarray:
    return np.unique(np.asarray(records.labels), return_inverse=True)[1]


def split_holdout(cfg: DataConfig, seed: int) -> tuple[TextRecords, TextRecords | None]:
    """Split the simulation's source into the institutions' pool and the holdout."""
    records = _load(cfg)
    if cfg.holdout_fraction == 0:
        return records, None
    pool, holdout = train_test_split(_label_ids(records), cfg.holdout_fraction, seed)
    return take(records, pool), take(records, holdout)


def simulated_institution(
    cfg: DataConfig, seed: int, partition_id: int, num_partitions: int
) -> InstitutionData:
    """Return virtual institution ``partition_id``'s share of the simulation data."""
    pool, _ = split_holdout(cfg, seed)
    if cfg.partition == "iid":
        parts = partition_iid(len(pool), num_partitions, seed)
        name = f"institution-{partition_id}"
    elif cfg.partition == "dirichlet":
        parts = partition_dirichlet(
            _label_ids(pool), num_partitions, cfg.dirichlet_alpha, seed
        )
        name = f"institution-{partition_id}"
    else:
        names, parts = partition_by_column(pool.columns[cfg.partition_column], num_partitions,
                                           cfg.partition_column)
        name = names[partition_id]
    return _split_local(take(pool, parts[partition_id]), name, cfg, seed + partition_id)


def local_institution(cfg: DataConfig, name: str, seed: int) -> InstitutionData:
    """Return an institution's own data file, split into train and held-out parts.

    The file is read every time (not cached): it may change between messages.
    """
    return _split_local(_read(cfg), name, cfg, seed)


def _split_local(records: TextRecords, name: str, cfg: DataConfig, seed: int) -> InstitutionData:
    if len(records) < 2:
        raise DataError(
            f"{records.source}: institution {name!r} has {len(records)} example(s); "
            "at least 2 are needed to train and hold out"
        )
    train_idx, test_idx = train_test_split(_label_ids(records), cfg.test_fraction, seed)
    if cfg.max_examples and len(train_idx) > cfg.max_examples:
        rng = np.random.default_rng(seed)
        train_idx = np.sort(rng.choice(train_idx, cfg.max_examples, replace=False))
    return InstitutionData(name, take(records, train_idx), take(records, test_idx))


def deidentified(data: InstitutionData, scrubber: Scrubber,
                 folder: Path | None) -> tuple[InstitutionData, Report]:
    """The institution's records with identifiers scrubbed, and what was replaced.

    Call it after the raw records are fingerprinted for the privacy ledger and before
    anything tokenises, caches or evaluates them; ``folder`` caches the scrubbed texts.
    """
    report = Report()
    train = scrubber.scrub_records(data.train, folder, report)
    test = scrubber.scrub_records(data.test, folder, report)
    return dataclasses.replace(data, train=train, test=test), report
