"""Head-only training on cached encoder features: same logits, same DP step, right cache."""

from __future__ import annotations

import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset
from transformers import RobertaConfig, RobertaForSequenceClassification

from fedsilo.client.privacy import DPPlan
from fedsilo.client.train import train_private
from fedsilo.common import features
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.model import (
    forward_logits,
    get_trainable_state,
    load_model,
    set_trainable,
    trainable_names,
)
from fedsilo.common.task import LabelMap

CPU = torch.device("cpu")
LABELS = LabelMap.from_names(["a", "b", "c"])


def _tokens(n: int = 12, length: int = 10, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, length // 2:] = 0  # some padded rows
    return TensorDataset(ids, mask, torch.randint(0, 3, (n,), generator=gen))


def _model(tiny_bert, trainable: str = "classifier"):
    cfg = FedsiloConfig.from_flat({"model": str(tiny_bert), "trainable": trainable})
    return load_model(cfg.model, LABELS, seed=1), cfg


def test_bert_head_on_features_reproduces_the_full_logits(tiny_bert):
    model, _ = _model(tiny_bert)
    model.eval()
    tokens = _tokens()
    head = features.head_only(model)
    assert head is not None
    feats = features.extract(model, tokens, CPU)
    assert feats.tensors[0].shape == (12, 32)
    assert torch.equal(feats.tensors[1], tokens.tensors[2])
    with torch.no_grad():
        full = forward_logits(model, *tokens.tensors[:2])
        assert torch.allclose(head(feats.tensors[0]), full, atol=1e-5)


def test_roberta_head_on_features_reproduces_the_full_logits():
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=3000, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=40, num_labels=3)
    model = RobertaForSequenceClassification(config)
    set_trainable(model, "classifier", 1)
    model.eval()
    tokens = _tokens()
    head = features.head_only(model)
    assert head is not None and head.pooler is None
    with torch.no_grad():
        full = forward_logits(model, *tokens.tensors[:2])
        assert torch.allclose(head(features.extract(model, tokens, CPU).tensors[0]), full,
                              atol=1e-5)


def test_only_head_only_models_take_the_feature_path(tiny_bert):
    for trainable in ("all", "top-k", "lora"):
        model, _ = _model(tiny_bert, trainable)
        assert features.head_only(model) is None
        net, sets = features.prepare(model, [_tokens()], CPU, None)
        assert net is model and len(sets[0].tensors) == 3


def test_dp_sgd_on_the_head_trains_the_models_own_tensors(tiny_bert):
    model, cfg = _model(tiny_bert)
    before = get_trainable_state(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in before}
    net, (train_in,) = features.prepare(model, [_tokens(40)], CPU, None)
    assert isinstance(net, features.Head)
    accountant = RDPAccountant()
    result = train_private(net, train_in, FedsiloConfig.from_flat({**cfg.to_flat(),
                                                                    "batch-size": 8}),
                           DPPlan(noise_multiplier=1.0, sample_rate=0.2, steps_per_round=5,
                                  planned_steps=5, target_epsilon=8.0, delta=1e-5,
                                  num_examples=40),
                           accountant, CPU)
    assert result.steps == 5 and accountant.history == [(1.0, 0.2, 5)]
    after = get_trainable_state(model)
    assert list(after) == trainable_names(model)  # the model's names, no Opacus prefix
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_the_cache_is_reused_and_keyed_by_tokens_and_frozen_weights(tiny_bert, tmp_path,
                                                                    monkeypatch):
    model, _ = _model(tiny_bert)
    calls = []
    real = features.extract
    monkeypatch.setattr(features, "extract",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    digest = features.frozen_digest(model)
    first = features.features_cached(tmp_path, model, digest, _tokens(), CPU)
    again = features.features_cached(tmp_path, model, digest, _tokens(), CPU)
    assert len(calls) == 1 and torch.equal(first.tensors[0], again.tensors[0])
    features.features_cached(tmp_path, model, digest, _tokens(seed=1), CPU)  # other data
    assert len(calls) == 2
    with torch.no_grad():  # other frozen weights: a new digest and a new file
        model.base_model.embeddings.word_embeddings.weight.add_(0.1)
    changed = features.frozen_digest(model)
    assert changed != digest
    moved = features.features_cached(tmp_path, model, changed, _tokens(), CPU)
    assert len(calls) == 3 and not torch.equal(moved.tensors[0], first.tensors[0])
    # The trained head is not part of the key: a new global head reuses the features.
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert features.frozen_digest(model) == changed


def test_an_unreadable_cache_file_is_recomputed(tiny_bert, tmp_path, logs):
    model, _ = _model(tiny_bert)
    digest = features.frozen_digest(model)
    good = features.features_cached(tmp_path, model, digest, _tokens(), CPU)
    (path,) = tmp_path.glob("features-*.pt")
    path.write_bytes(b"not a tensor file")
    again = features.features_cached(tmp_path, model, digest, _tokens(), CPU)
    assert torch.equal(good.tensors[0], again.tensors[0])
    assert "unreadable" in logs.text
    assert torch.load(path, weights_only=True)[0].shape == good.tensors[0].shape


def test_a_head_that_does_not_reproduce_the_logits_falls_back(tiny_bert, monkeypatch, logs):
    model, _ = _model(tiny_bert)
    real = features.Head.forward  # a head that gets the architecture wrong
    monkeypatch.setattr(features.Head, "forward", lambda self, f: real(self, f) + 1e-3)
    tokens = _tokens()
    net, (inputs,) = features.prepare(model, [tokens], CPU, None)
    assert net is model and inputs is tokens
    assert "does not reproduce" in logs.text
