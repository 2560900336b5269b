"""Mean pooling: chosen from the checkpoint, padding-proof, head-only, and loadable anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, RobertaConfig

from fedsilo.common import features
from fedsilo.common.config import ModelConfig
from fedsilo.common.model import (
    ModelError,
    check_checkpoint,
    forward_logits,
    load_model,
    resolve_pooling,
    trainable_names,
)
from fedsilo.common.pooling import MeanPoolBertForSequenceClassification
from fedsilo.common.records import LabelMap
from fedsilo.server.outputs import save_model

LABELS = LabelMap.from_names(["a", "b", "c"])
CPU = torch.device("cpu")


def _load(folder: Path, pooling: str = "auto", trainable: str = "classifier"):
    return load_model(ModelConfig(model=str(folder), pooling=pooling, trainable=trainable),
                      LABELS, seed=0)


def _tokens(n: int = 6, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, length // 2:] = 0
    return ids, mask


def test_auto_pooling_follows_the_checkpoints_own_pooling_config(tiny_bert, tiny_st_bert):
    assert isinstance(_load(tiny_st_bert), MeanPoolBertForSequenceClassification)
    plain = _load(tiny_bert)
    assert type(plain) is BertForSequenceClassification
    assert type(_load(tiny_st_bert, pooling="cls")) is BertForSequenceClassification
    assert isinstance(_load(tiny_bert, pooling="mean"), MeanPoolBertForSequenceClassification)
    # The bundled MiniLM is a sentence-transformers model trained with mean pooling.
    path, saved = check_checkpoint("all-MiniLM-L6-v2")
    assert resolve_pooling(ModelConfig(), path, saved) == "mean"
    assert resolve_pooling(ModelConfig(pooling="cls"), path, saved) == "cls"


def test_mean_pooling_trains_the_linear_classifier_only_and_ignores_padding(tiny_st_bert):
    model = _load(tiny_st_bert).eval()
    assert trainable_names(model) == ["classifier.weight", "classifier.bias"]
    assert not any("pooler" in name for name, _ in model.named_parameters())
    ids, mask = _tokens()
    with torch.no_grad():
        logits = forward_logits(model, ids, mask)
        # The same texts padded with four more (masked) tokens give the same logits.
        padded = forward_logits(model, torch.cat([ids, ids[:, :4]], 1),
                                torch.cat([mask, torch.zeros_like(mask[:, :4])], 1))
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(logits, padded, atol=1e-5)
    # Row 0 keeps only its first half: its logits read the mean of those four states.
    expected = model.classifier(hidden[0, :4].mean(0))
    assert torch.allclose(logits[0], expected, atol=1e-5)


def test_head_on_mean_features_reproduces_the_full_model(tiny_st_bert):
    model = _load(tiny_st_bert)
    ids, mask = _tokens()
    tokens = torch.utils.data.TensorDataset(ids, mask, torch.zeros(len(ids), dtype=torch.long))
    head, (feats,) = features.prepare(model, [tokens], CPU, None)
    assert isinstance(head, features.Head) and head.mean
    assert {id(p) for p in head.parameters()} == {id(model.classifier.weight),
                                                  id(model.classifier.bias)}
    model.eval()
    head.eval()
    with torch.no_grad():
        assert torch.allclose(head(feats.tensors[0]), forward_logits(model, ids, mask),
                              atol=1e-5)


def test_pooling_settings_that_cannot_work_name_the_flag(tiny_bert, tmp_path):
    roberta = tmp_path / "roberta"
    RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64).save_pretrained(roberta)
    with pytest.raises(ModelError, match="--pooling mean: .*BERT-family"):
        _load(roberta, pooling="mean")
    saved = tmp_path / "mean-model"
    save_model(_load(tiny_bert, pooling="mean"), AutoTokenizer.from_pretrained(tiny_bert), saved)
    with pytest.raises(ModelError, match="--pooling cls: .*mean-pooling classifier"):
        _load(saved, pooling="cls")


def test_a_saved_mean_model_reloads_and_runs_in_a_plain_pipeline(tiny_bert, tmp_path):
    model = _load(tiny_bert, pooling="mean", trainable="all").eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tokenizer(["cholera due to vibrio cholerae"], return_tensors="pt")
    with torch.no_grad():
        expected = forward_logits(model, enc["input_ids"], enc["attention_mask"])[0]
    folder = tmp_path / "out"
    save_model(model, tokenizer, folder)
    assert (folder / "pooling.py").is_file()
    # fedsilo reads the folder back (auto pooling) as the same classifier.
    again = _load(folder).eval()
    with torch.no_grad():
        assert torch.allclose(forward_logits(again, enc["input_ids"], enc["attention_mask"])[0],
                              expected, atol=1e-5)
    # A fresh interpreter without fedsilo: plain transformers refuses the custom code
    # unless trusted, then loads it from the folder and predicts the same logits.
    script = (
        "import sys, json\n"
        "from transformers import pipeline\n"
        "try:\n"
        f"    pipeline('text-classification', model={str(folder)!r}, device='cpu')\n"
        "    print('LOADED-UNTRUSTED')\n"
        "except ValueError:\n"
        "    print('REFUSED')\n"
        f"clf = pipeline('text-classification', model={str(folder)!r}, device='cpu',"
        " trust_remote_code=True, top_k=None)\n"
        "assert 'fedsilo' not in sys.modules\n"
        "print(json.dumps(clf('cholera due to vibrio cholerae')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED" in done.stdout and "LOADED-UNTRUSTED" not in done.stdout
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    rows = rows[0] if isinstance(rows[0], list) else rows  # one text: its list of scores
    scores = {row["label"]: row["score"] for row in rows}
    probs = torch.softmax(expected, -1)
    for i, name in enumerate(LABELS.names):
        assert scores[name] == pytest.approx(float(probs[i]), abs=1e-5)
