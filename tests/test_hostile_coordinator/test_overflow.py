"""A received head that overflows one record's logit still yields a finite update.

The coordinator controls the model it sends. A head whose entries are finite float32
numbers near 10³⁷, aimed at one record's features, makes only that record's logit
overflow to inf; its loss and gradient are then NaN, and Opacus's clipping
(``C / norm`` times the gradient: ``0 · inf`` is NaN) would release a NaN update
exactly when the record was trained on, an exact membership answer that no noise
hides. Every mode must give that example zero weight instead.
"""

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from fedsilo.client import privacy
from fedsilo.client.train import train_private
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.features import Head
from fedsilo.common.model import get_trainable_state, load_model, set_trainable_state
from fedsilo.common.records import LabelMap

N, TARGET, SCALE = 16, 5, 1.5e37


def _features() -> TensorDataset:
    torch.manual_seed(3)
    return TensorDataset(torch.randn(N, 32), torch.randint(0, 3, (N,)))


def _crafted(head: Head, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The hostile head: class 0's row is ±1.5e37 along the target's signs."""
    state = get_trainable_state(head)
    weight = torch.zeros_like(state["classifier.weight"])
    weight[0] = SCALE * torch.sign(target)
    return {**state, "classifier.weight": weight}


def _update(tiny_st_bert, mode: str, data: TensorDataset, crafted: dict) -> np.ndarray:
    cfg = FedsiloConfig.from_flat({"model": str(tiny_st_bert), "grad-sample-mode": mode,
                                   "batch-size": len(data), "local-epochs": 2})
    head = Head(load_model(cfg.model, LabelMap.from_names(["a", "b", "c"]), seed=0))
    set_trainable_state(head, crafted)
    plan = privacy.plan(num_examples=len(data), batch_size=len(data), local_epochs=2,
                        num_rounds=1, target_epsilon=8.0, delta=1e-3, accountant="rdp")
    train_private(head, data, cfg, plan, RDPAccountant(), torch.device("cpu"))
    return np.concatenate([(v - crafted[k]).numpy().ravel()
                           for k, v in get_trainable_state(head).items()])


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks", "functorch"])
def test_an_overflowing_record_leaves_the_update_finite(tiny_st_bert, mode):
    data = _features()
    features, labels = data.tensors
    head = Head(load_model(FedsiloConfig.from_flat({"model": str(tiny_st_bert)}).model,
                           LabelMap.from_names(["a", "b", "c"]), seed=0)).eval()
    crafted = _crafted(head, features[TARGET])
    set_trainable_state(head, crafted)
    with torch.no_grad():
        logits = head(features)
    # The attack as sent: only the target's logit overflows, every entry is finite.
    assert all(torch.isfinite(v).all() for v in crafted.values())
    assert not torch.isfinite(logits[TARGET]).all()
    assert torch.isfinite(torch.cat([logits[:TARGET], logits[TARGET + 1:]])).all()
    without = TensorDataset(torch.cat([features[:TARGET], features[TARGET + 1:]]),
                            torch.cat([labels[:TARGET], labels[TARGET + 1:]]))
    for dataset in (data, without):  # Poisson rate 1: the target is in every batch
        update = _update(tiny_st_bert, mode, dataset, crafted)
        assert np.isfinite(update).all()
        assert np.abs(update).max() > 0  # it trained (noise at least)
