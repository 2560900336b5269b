"""The on-disk tokenisation cache: hits reuse tensors, any change of input misses."""

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from fedsilo.common import token_cache
from fedsilo.common.model import resolve_model_path
from fedsilo.common.records import LabelMap, TextRecords


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


@pytest.fixture
def records():
    return TextRecords(texts=["acute appendicitis", "fracture of the left femur", "asthma"],
                       labels=["a", "b", "a"], columns={}, source="notes.csv")


LABELS = LabelMap.from_names(["a", "b"])


def _count_encodes(monkeypatch):
    calls = []
    real = token_cache.encode

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(token_cache, "encode", counting)
    return calls


def test_a_hit_reuses_the_tensors_without_tokenising(tmp_path, tokenizer, records, monkeypatch):
    calls = _count_encodes(monkeypatch)
    first = token_cache.encode_cached(tmp_path, tokenizer, records, LABELS, 16)
    second = token_cache.encode_cached(tmp_path, tokenizer, records, LABELS, 16)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    for a, b in zip(first.tensors, second.tensors, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change", ["text", "label", "order", "max_length", "tokenizer",
                                    "label_map"])
def test_any_change_of_input_misses(tmp_path, tokenizer, records, monkeypatch, change):
    token_cache.encode_cached(tmp_path, tokenizer, records, LABELS, 16)
    calls = _count_encodes(monkeypatch)
    labels, max_length = LABELS, 16
    if change == "text":
        records = dataclasses.replace(records, texts=["acute appendicitis!", *records.texts[1:]])
    elif change == "label":
        records = dataclasses.replace(records, labels=["b", "b", "a"])
    elif change == "order":
        records = dataclasses.replace(records, texts=records.texts[::-1],
                                      labels=records.labels[::-1])
    elif change == "max_length":
        max_length = 8
    elif change == "tokenizer":
        tokenizer.add_tokens(["appendicitis"])
    else:
        labels = LabelMap.from_names(["a", "b", "c"])
    dataset = token_cache.encode_cached(tmp_path, tokenizer, records, labels, max_length)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.pt"))) == 2
    fresh = token_cache.encode(tokenizer, records, labels, max_length)
    for a, b in zip(dataset.tensors, fresh.tensors, strict=True):
        assert torch.equal(a, b)


def test_a_corrupt_cache_file_is_replaced(tmp_path, tokenizer, records, caplog):
    token_cache.encode_cached(tmp_path, tokenizer, records, LABELS, 16)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a tensor file")
    dataset = token_cache.encode_cached(tmp_path, tokenizer, records, LABELS, 16)
    assert "unreadable" in caplog.text
    assert len(dataset) == 3
    assert torch.equal(torch.load(path, weights_only=True)[0], dataset.tensors[0])
