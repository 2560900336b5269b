"""LoRA adapters: what trains and travels, DP-SGD through Opacus, a plain checkpoint at the end."""

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedsilo.client import privacy
from fedsilo.client.train import train_private
from fedsilo.common.config import FedsiloConfig, ModelConfig
from fedsilo.common.model import (
    ModelError,
    forward_logits,
    get_trainable_state,
    load_model,
    trainable_names,
)
from fedsilo.common.records import LabelMap
from fedsilo.server.outputs import save_model

LABELS = LabelMap.from_names(["a", "b", "c"])


def _lora(tiny_bert, **extra) -> torch.nn.Module:
    return load_model(ModelConfig(model=str(tiny_bert), trainable="lora", lora_rank=4, **extra),
                      LABELS, seed=0)


def test_only_adapters_and_head_train_and_travel(tiny_bert):
    model = _lora(tiny_bert)
    names = trainable_names(model)
    adapters = [n for n in names if ".lora_" in n]
    # query and value of both layers, A and B each
    assert len(adapters) == 2 * 2 * 2
    assert all(".query." in n or ".value." in n for n in adapters)
    assert {n for n in names if ".lora_" not in n} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias",
        "classifier.weight", "classifier.bias"}
    full = sum(p.numel() for p in model.parameters())
    sent = sum(t.numel() for t in get_trainable_state(model).values())
    assert sent < full / 5


def test_dp_sgd_trains_adapters_and_leaves_the_base_frozen(tiny_bert):
    model = _lora(tiny_bert)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    n = 40
    data = TensorDataset(torch.randint(1000, 5000, (n, 10)), torch.ones(n, 10, dtype=torch.long),
                         torch.randint(0, 3, (n,)))
    cfg = FedsiloConfig.from_flat({"model": str(tiny_bert), "trainable": "lora",
                                   "lora-rank": 4, "batch-size": 10, "learning-rate": 0.05})
    plan = privacy.plan(num_examples=n, batch_size=10, local_epochs=1, num_rounds=1,
                        target_epsilon=8.0, delta=1e-3, accountant="rdp")
    result = train_private(model, data, cfg, plan, RDPAccountant(), torch.device("cpu"))
    assert result.steps == 4
    state = get_trainable_state(model)
    assert list(state) == trainable_names(model)  # unwrapped names, no "_module."
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert changed == set(state)  # every adapter and head tensor moved, nothing else


def test_the_saved_model_is_a_plain_checkpoint_with_the_adapters_merged(tiny_bert, tmp_path):
    model = _lora(tiny_bert)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: give the adapters an effect
                param.normal_(0, 0.5)
    model.eval()
    ids = torch.randint(1000, 5000, (3, 8))
    mask = torch.ones_like(ids)
    expected = forward_logits(model, ids, mask)
    save_model(model, AutoTokenizer.from_pretrained(tiny_bert), tmp_path / "model")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    assert not any(".lora_" in n for n, _ in plain.named_parameters())
    assert torch.allclose(forward_logits(plain, ids, mask), expected, atol=1e-5)


def test_unknown_lora_target_names_the_flag(tiny_bert):
    with pytest.raises(ModelError, match="--lora-targets"):
        _lora(tiny_bert, lora_targets="no_such_layer")
