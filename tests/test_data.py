import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedsilo.common.records import (
    DataError,
    LabelMap,
    TextRecords,
    icd10_label_names,
    load_records,
    train_test_split,
)

ROWS = [
    {"text": "chest pain on exertion", "label": "cardio", "site": "north"},
    {"text": "fractured left wrist", "label": "injury", "site": "south"},
    {"text": "persistent, dry cough", "label": "resp", "site": "north"},
]


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    lines = [",".join(rows[0])]
    lines += [",".join(f'"{v}"' for v in row.values()) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"data.csv": write_csv, "data.jsonl": write_jsonl, "data.parquet": write_parquet}


@pytest.mark.parametrize("name", WRITERS)
def test_each_format_loads_the_same_records(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, ROWS)
    records = load_records(str(path), extra_columns=["site"])
    assert records == TextRecords(
        texts=[r["text"] for r in ROWS],
        labels=[r["label"] for r in ROWS],
        columns={"site": ["north", "south", "north"]},
        source=str(path),
    )
    assert len(records) == 3


def test_custom_columns_and_int_labels_become_strings(tmp_path: Path) -> None:
    rows = [{"note": "a", "y": 3}, {"note": "b", "y": 0}]
    records = load_records(str(write_jsonl(tmp_path / "d.json", rows)), "note", "y")
    assert records.texts == ["a", "b"]
    assert records.labels == ["3", "0"]
    assert records.columns == {}


@pytest.mark.parametrize(("kwargs", "column", "flag"), [
    ({"text_column": "body"}, "body", "--text-column"),
    ({"label_column": "y"}, "y", "--label-column"),
    ({"extra_columns": ["hospital"]}, "hospital", "--partition-column"),
])
def test_missing_column_names_column_flag_and_choices(
    tmp_path: Path, kwargs: dict[str, object], column: str, flag: str
) -> None:
    path = write_csv(tmp_path / "d.csv", ROWS)
    with pytest.raises(DataError) as err:
        load_records(str(path), **kwargs)
    message = str(err.value)
    assert str(path) in message and f"'{column}'" in message and flag in message
    assert "text, label, site" in message


def test_empty_text_and_null_label_name_the_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"text": " ", "label": "x"}])
    with pytest.raises(DataError, match=r"line 2: column 'text'"):
        load_records(str(path))
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"text": "t", "label": None}])
    with pytest.raises(DataError, match=r"line 2: column 'label' is empty"):
        load_records(str(path))
    path = tmp_path / "d.csv"
    path.write_text("text,label\nok,a\nshort\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: column 'label' is empty"):
        load_records(str(path))


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv' is empty"):
        load_records(str(path))


def test_undecodable_bytes_name_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\nna\xefve,a\n")
    with pytest.raises(DataError, match=r"latin\.csv' is not valid UTF-8 .*offset 13"):
        load_records(str(path))


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl' line 3 is not a JSON object"):
        load_records(str(path))
    path.write_text('{"text": "a", "label": "x"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 is not a JSON object"):
        load_records(str(path))


def test_unsupported_suffix_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "d.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"'\.xlsx'.*\.csv, \.jsonl, \.json, \.parquet"):
        load_records(str(path))


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv' does not exist"):
        load_records(str(tmp_path / "nope.csv"))
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet' is not a readable Parquet file"):
        load_records(str(path))


def test_icd10_builtin() -> None:
    records = load_records("icd10")
    assert len(records) == 36355
    counts = Counter(records.labels)
    assert len(counts) == 22
    assert sorted(counts) == sorted(icd10_label_names())
    assert 0.27 < counts.most_common(1)[0][1] / len(records) < 0.29
    assert icd10_label_names()[0].startswith("Certain infectious and parasitic diseases")
    assert records.texts[0] == "Cholera due to Vibrio cholerae 01, biovar cholerae"
    with pytest.raises(DataError, match="icd10"):
        load_records("icd10", extra_columns=["site"])


def test_label_map_roundtrip_and_validation() -> None:
    label_map = LabelMap.from_names(["b", "a", "c"])
    assert label_map.num_labels == 3
    assert label_map.id2label == {0: "b", 1: "a", 2: "c"}
    assert label_map.label2id == {"b": 0, "a": 1, "c": 2}
    assert LabelMap.from_json(label_map.to_json()) == label_map
    encoded = label_map.encode(["a", "c", "a"], "x.csv")
    assert encoded.dtype == np.int64 and encoded.tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="duplicated"):
        LabelMap.from_names(["a", "b", "a"])
    with pytest.raises(ValueError, match="at least one"):
        LabelMap.from_names([])
    with pytest.raises(ValueError, match="JSON list of strings"):
        LabelMap.from_json('{"names": ["a"]}')


def test_encode_unknown_label_names_file_and_labels() -> None:
    label_map = LabelMap.from_names(["cardio", "resp"])
    with pytest.raises(DataError) as err:
        label_map.encode(["cardio", "derm", "derm", "onco"], "site_b.csv")
    message = str(err.value)
    assert "site_b.csv" in message
    assert "'derm' (2 rows)" in message and "'onco' (1 rows)" in message
    assert "'cardio', 'resp'" in message and "label map must include them" in message


def test_train_test_split_is_stratified_deterministic_and_covering() -> None:
    labels = np.array(["a"] * 100 + ["b"] * 50 + ["c"] * 2 + ["d"])
    train, test = train_test_split(labels, 0.2, seed=7)
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert not np.intersect1d(train, test).size
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert Counter(labels[test].tolist()) == {"a": 20, "b": 10}
    assert "c" in labels[train] and "d" in labels[train]
    again = train_test_split(labels, 0.2, seed=7)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(train_test_split(labels, 0.2, seed=8)[1], test)


def test_train_test_split_rejects_bad_fractions() -> None:
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            train_test_split(np.array([0, 1, 0, 1]), fraction, seed=0)
    with pytest.raises(ValueError, match="empty"):
        train_test_split(np.array([0, 0, 1, 1]), 0.1, seed=0)
