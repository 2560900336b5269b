import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.common.config import ModelConfig
from fedsilo.common.model import (
    ModelError,
    forward_logits,
    get_trainable_state,
    load_model,
    set_trainable_state,
    trainable_names,
)
from fedsilo.common.records import LabelMap

LABELS = LabelMap.from_names(["a", "b", "c"])


def _model(tiny_bert, **kw):
    return load_model(ModelConfig(model=str(tiny_bert), **kw), LABELS, seed=0)


def test_trainable_selection(tiny_bert):
    head = _model(tiny_bert, trainable="classifier")
    names = trainable_names(head)
    assert names and all(n.startswith(("classifier.", "bert.pooler.")) for n in names)
    top1 = trainable_names(_model(tiny_bert, trainable="top-k", top_k=1))
    assert set(names) < set(top1)
    assert any(n.startswith("bert.encoder.layer.1.") for n in top1)
    assert not any(n.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for n in top1)
    everything = _model(tiny_bert, trainable="all")
    assert trainable_names(everything) == [n for n, _ in everything.named_parameters()]
    with pytest.raises(ModelError, match="--top-k 5"):
        _model(tiny_bert, trainable="top-k", top_k=5)


def test_same_seed_builds_the_same_new_head(tiny_bert):
    a, b = _model(tiny_bert), _model(tiny_bert)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert a.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_missing_model_names_the_flag(tmp_path):
    with pytest.raises(ModelError, match="--model"):
        load_model(ModelConfig(model=str(tmp_path / "nope")), LABELS, seed=0)


def test_update_keys_match_the_unwrapped_model_after_opacus(tiny_bert):
    model = _model(tiny_bert, trainable="top-k", top_k=1)
    before = get_trainable_state(model)
    model.train()
    data = TensorDataset(torch.randint(1000, 2000, (16, 8)), torch.ones(16, 8, dtype=torch.long),
                         torch.randint(0, 3, (16,)))
    dp_model, opt, crit, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.5),
        criterion=torch.nn.CrossEntropyLoss(), data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
    assert any(k.startswith("_module.") for k in dp_model.state_dict())
    for x, m, y in loader:
        opt.zero_grad()
        crit(forward_logits(dp_model, x, m), y).backward()
        opt.step()
    dp_model._close()
    after = get_trainable_state(model)
    assert list(after) == list(before) == trainable_names(model)
    assert not any(k.startswith("_module.") for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_set_trainable_state_checks_keys_and_shapes(tiny_bert):
    model = _model(tiny_bert, trainable="classifier")
    state = get_trainable_state(model)
    fresh = {k: torch.zeros_like(v) for k, v in state.items()}
    set_trainable_state(model, fresh)
    assert all(torch.count_nonzero(v) == 0 for v in get_trainable_state(model).values())
    with pytest.raises(ValueError, match="missing"):
        set_trainable_state(model, dict(list(fresh.items())[1:]))
    with pytest.raises(ValueError, match="unexpected"):
        set_trainable_state(model, {**fresh, "bert.embeddings.word_embeddings.weight":
                                    torch.zeros(1)})
    key = next(iter(fresh))
    with pytest.raises(ValueError, match="shape"):
        set_trainable_state(model, {**fresh, key: torch.zeros(7)})
