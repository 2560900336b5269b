"""The saved model carries the length it was trained with, so ``pipeline`` copes with long texts."""

import json

from transformers import AutoTokenizer, pipeline

from fedsilo.common.config import ModelConfig
from fedsilo.common.model import load_model
from fedsilo.common.records import LabelMap
from fedsilo.server.outputs import save_model

LONG = " ".join(f"patient reported symptom number {i} during the visit" for i in range(120))
LABELS = LabelMap.from_names(["a", "b"])


def _save(tiny_bert, tmp_path, pooling):
    model = load_model(ModelConfig(model=str(tiny_bert), pooling=pooling), LABELS, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    assert len(tokenizer(LONG)["input_ids"]) > 512
    save_model(model, tokenizer, tmp_path / pooling, max_length=32)
    assert tokenizer.model_max_length == 512  # the caller's tokenizer is left as it was
    return tmp_path / pooling


def test_mean_pooling_model_truncates_by_default_in_a_plain_pipeline(tiny_bert, tmp_path):
    folder = _save(tiny_bert, tmp_path, "mean")
    assert json.loads((folder / "config.json").read_text())["fedsilo_max_length"] == 32
    classify = pipeline("text-classification", model=str(folder), device="cpu",
                        trust_remote_code=True)
    assert classify(LONG)[0]["label"] in ("a", "b")  # no truncation argument needed
    # the cut is the trained length: the same as tokenising at 32 tokens
    assert classify(LONG)[0]["score"] == classify(LONG, truncation=True)[0]["score"]


def test_plain_bert_tokenizer_truncates_at_the_trained_length(tiny_bert, tmp_path):
    folder = _save(tiny_bert, tmp_path, "cls")
    saved = AutoTokenizer.from_pretrained(folder)
    assert saved.model_max_length == 32
    assert len(saved(LONG, truncation=True)["input_ids"]) == 32
    classify = pipeline("text-classification", model=str(folder), device="cpu")
    assert classify(LONG, truncation=True)[0]["label"] in ("a", "b")
