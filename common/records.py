"""Loading labelled text records, label maps and train/test splits.

Records come from a ``.csv``, ``.jsonl``/``.json`` (JSON Lines) or ``.parquet`` file,
or from the built-in ``icd10`` dataset (ICD-10-CM code descriptions labelled by chapter).
Every problem with the input raises :class:`DataError` with a message that names the
file and the column or row at fault and says how to fix it.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

logger = logging.getLogger(__name__)

ICD10 = "icd10"
SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
#: Longest accepted text or label value, in characters (the model reads only the first
#: ``max-length`` tokens; a longer value is almost always a broken export).
MAX_FIELD_CHARS = 1_000_000
#: Longest accepted JSON Lines line, checked before parsing so a huge line fails fast.
MAX_LINE_CHARS = 4 * MAX_FIELD_CHARS


class DataError(ValueError):
    """The input data is unusable; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class TextRecords:
    """Texts with their label names and any extra requested columns."""

    texts: list[str]
    labels: list[str]
    columns: dict[str, list[str]]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class _Table:
    columns: dict[str, list[object]]
    locations: list[str]


def load_records(
    source: str,
    text_column: str = "text",
    label_column: str = "label",
    extra_columns: Sequence[str] = (),
) -> TextRecords:
    """Load text records from a data file or the built-in ``icd10`` dataset.

    ``source`` is ``"icd10"`` or a ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` path;
    the column names are ignored for ``icd10``. Labels and ``extra_columns`` (e.g. an
    institution column) are returned as strings.

    Raises
    ------
    DataError
        If the source is missing, unreadable, malformed or lacks a requested column.

    """
    if source == ICD10:
        if extra_columns:
            raise DataError(
                f"built-in dataset '{ICD10}' has no extra columns (requested: "
                f"{', '.join(extra_columns)}); use a data file that has them"
            )
        texts, labels = _icd10_rows()
        return TextRecords(list(texts), list(labels), {}, ICD10)
    table = _read_table(Path(source))
    texts = _values(source, table, text_column, "--text-column", _text)
    labels = _values(source, table, label_column, "--label-column", _value)
    extras = {name: _values(source, table, name, "--partition-column", _value)
              for name in extra_columns}
    logger.info("loaded %d records with %d distinct labels from %s",
                len(texts), len(set(labels)), source)
    return TextRecords(texts, labels, extras, source)


def _read_table(path: Path) -> _Table:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"data file '{path}' has unsupported suffix '{path.suffix}'; use one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} or '{ICD10}' for the built-in dataset"
        )
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist or is not a file; check the path")
    if suffix == ".parquet":
        table = _read_parquet(path)
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as err:
            raise DataError(
                f"data file '{path}' is not valid UTF-8 (bad byte at offset {err.start}); "
                "re-save it with UTF-8 encoding"
            ) from err
        table = _read_csv(path, text) if suffix == ".csv" else _read_jsonl(path, text)
    if not table.locations:
        raise DataError(f"data file '{path}' is empty (no data rows); add labelled rows")
    return table


def _too_long(path: Path | str, where: str, size: int | str) -> DataError:
    return DataError(f"data file '{path}' {where}: a value is {size} characters long, "
                     f"over the limit of {MAX_FIELD_CHARS:,}; shorten or split that text, or "
                     "remove the row")


def _read_csv(path: Path, text: str) -> _Table:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[dict[str, str]] = []
    locations: list[str] = []
    limit = csv.field_size_limit(MAX_FIELD_CHARS)  # the csv module's limit is global
    try:
        for row in reader:
            rows.append(row)
            locations.append(f"line {reader.line_num}")
    except csv.Error as err:
        line = reader.reader.line_num  # DictReader's own count lags on a failing row
        if "field larger than field limit" in str(err):
            raise _too_long(path, f"line {line}", f"over {MAX_FIELD_CHARS:,}") from None
        raise DataError(f"data file '{path}' line {line}: malformed CSV ({err}); "
                        "fix that line") from err
    finally:
        csv.field_size_limit(limit)
    names = [n for n in reader.fieldnames or () if n]
    return _Table({n: [row.get(n) for row in rows] for n in names}, locations)


def _read_jsonl(path: Path, text: str) -> _Table:
    rows: list[dict[str, object]] = []
    locations: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise _too_long(path, f"line {number}", f"{len(line):,}")
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise DataError(
                f"data file '{path}' line {number} is not a JSON object; JSON Lines files "
                "need one object per line, e.g. {\"text\": \"...\", \"label\": \"...\"}"
            )
        rows.append(row)
        locations.append(f"line {number}")
    names = list(dict.fromkeys(key for row in rows for key in row))
    return _Table({n: [row.get(n) for row in rows] for n in names}, locations)


def _read_parquet(path: Path) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data file '{path}' is not a readable Parquet file ({err}); "
                        "re-export it as Parquet") from err
    locations = [f"row {i}" for i in range(1, table.num_rows + 1)]
    return _Table({n: table.column(n).to_pylist() for n in table.column_names}, locations)


def _values(
    source: str, table: _Table, name: str, flag: str, convert: Callable[..., str]
) -> list[str]:
    if name not in table.columns:
        raise DataError(
            f"data file '{source}' has no column '{name}' (columns: "
            f"{', '.join(table.columns) or 'none'}); set {flag} to one of them"
        )
    return [convert(source, name, value, location)
            for value, location in zip(table.columns[name], table.locations, strict=True)]


def _text(source: str, column: str, value: object, location: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"data file '{source}' {location}: column '{column}' has no text "
                        f"(got {value!r:.80}); fill it in or remove the row")
    if len(value) > MAX_FIELD_CHARS:
        raise _too_long(source, f"{location}, column '{column}'", f"{len(value):,}")
    return value


def _value(source: str, column: str, value: object, location: str) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    if missing or (isinstance(value, str) and not value.strip()):
        raise DataError(f"data file '{source}' {location}: column '{column}' is empty; "
                        "fill it in or remove the row")
    text = str(value)
    if len(text) > MAX_FIELD_CHARS:
        raise _too_long(source, f"{location}, column '{column}'", f"{len(text):,}")
    return text


def _icd10_package() -> ModuleType:
    """Import ``simple_icd_10_cm`` without its import-time DeprecationWarnings (noise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its importlib.resources calls
        import simple_icd_10_cm

    return simple_icd_10_cm


@functools.lru_cache(maxsize=1)
def _icd10_rows() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return the built-in ICD-10-CM descriptions and their chapter descriptions."""
    cm = _icd10_package()
    codes: dict[str, None] = {}
    for code in cm.get_all_codes(with_dots=False):
        if cm.is_leaf(code):
            if cm.is_extended_subcategory(code):
                code = cm.get_parent(code).replace(".", "")  # cm.remove_dot is O(n)
            codes[code] = None
    texts = tuple(map(cm.get_description, codes))
    labels = tuple(cm.get_description(next(a for a in cm.get_ancestors(c) if cm.is_chapter(a)))
                   for c in codes)
    logger.info("built the %s dataset: %d codes, %d chapters",
                ICD10, len(texts), len(set(labels)))
    return texts, labels


@functools.lru_cache(maxsize=1)
def icd10_label_names() -> list[str]:
    """Return the 22 ICD-10-CM chapter descriptions (the ``icd10`` labels) in chapter order."""
    cm = _icd10_package()
    return [cm.get_description(c) for c in cm.get_all_codes(with_dots=False)
            if cm.is_chapter(c)]


@dataclass(frozen=True)
class LabelMap:
    """The federation-wide, ordered list of label names and their integer ids."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a label map needs at least one label name")
        duplicates = sorted(n for n, c in Counter(self.names).items() if c > 1)
        if duplicates:
            raise ValueError(f"label names must be unique; duplicated: {duplicates}")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> LabelMap:
        """Build a label map whose ids follow the order of ``names``."""
        return cls(tuple(names))

    @property
    def num_labels(self) -> int:
        """Return the number of labels."""
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        """Return the mapping from id to label name."""
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        """Return the mapping from label name to id."""
        return {name: i for i, name in enumerate(self.names)}

    def encode(self, labels: Sequence[str], source: str) -> np.ndarray:
        """Map label names to int64 ids.

        Raises
        ------
        DataError
            If ``labels`` holds names outside the map; the message names ``source``.

        """
        label2id = self.label2id
        unknown = Counter(label for label in labels if label not in label2id)
        if unknown:
            shown = ", ".join(f"'{name}' ({count} rows)" for name, count in unknown.most_common(5))
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            known = ", ".join(f"'{n}'" for n in self.names[:10])
            known += ", ..." if self.num_labels > 10 else ""
            raise DataError(
                f"data file '{source}' has labels outside the federation's label map: "
                f"{shown}{more}; known labels ({self.num_labels}): {known}. The federation's "
                "label map must include them, or the rows must be removed"
            )
        return np.fromiter((label2id[label] for label in labels), dtype=np.int64,
                           count=len(labels))

    def to_json(self) -> str:
        """Serialise the label names as a JSON list."""
        return json.dumps(list(self.names))

    @classmethod
    def from_json(cls, text: str) -> LabelMap:
        """Parse a label map written by :meth:`to_json`."""
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"a label map must be a JSON list of strings, got {text[:80]!r}")
        return cls.from_names(names)


def train_test_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and test, stratified by label.

    Each class with at least two examples keeps at least one in train and contributes
    about ``test_fraction`` of its examples to test; singleton classes are pooled and
    split at random.

    Returns sorted int64 train and test indices, disjoint and covering all examples.

    Raises
    ------
    ValueError
        If ``test_fraction`` is outside (0, 1) or the test split would be empty.

    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    test = [np.array([], dtype=np.int64)]
    singletons: list[np.ndarray] = []
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(inverse == c))
        if len(idx) == 1:
            singletons.append(idx)
        else:
            test.append(idx[:min(int(len(idx) * test_fraction + 0.5), len(idx) - 1)])
    if singletons:
        pool = rng.permutation(np.concatenate(singletons))
        test.append(pool[:int(len(pool) * test_fraction + 0.5)])
    test_idx = np.sort(np.concatenate(test))
    if not len(test_idx):
        raise ValueError(f"test_fraction {test_fraction} of {len(labels)} examples leaves "
                         "the test split empty; use a larger fraction or more data")
    train_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test_idx)
    return train_idx, test_idx
