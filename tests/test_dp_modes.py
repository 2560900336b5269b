"""Ghost clipping (the default) computes the same clipped gradients as per-sample hooks."""

import copy

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.client import privacy
from fedsilo.client.train import train_private
from fedsilo.common.config import FedsiloConfig, ModelConfig
from fedsilo.common.data import LabelMap
from fedsilo.common.model import forward_logits, load_model


def _data(n: int = 12, length: int = 10) -> TensorDataset:
    torch.manual_seed(0)
    ids = torch.randint(1000, 5000, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, 7:] = 0  # some padding
    return TensorDataset(ids, mask, torch.randint(0, 3, (n,)))


def _model(tiny_bert, trainable: str, pooling: str = "auto") -> nn.Module:
    return load_model(ModelConfig(model=str(tiny_bert), trainable=trainable, top_k=1,
                                  pooling=pooling),
                      LabelMap.from_names(["a", "b", "c"]), seed=0)


def _clipped_gradients(model: nn.Module, data: TensorDataset, mode: str,
                       max_grad_norm: float, physical: int = 0) -> dict[str, torch.Tensor]:
    """One noise-free DP-SGD step (SGD, lr 1); return the resulting parameter change."""
    model = copy.deepcopy(model).train()
    for module in model.modules():  # the same forward pass in both modes
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    criterion = nn.CrossEntropyLoss()
    wrapped = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, criterion=criterion,
        data_loader=DataLoader(data, batch_size=len(data)), noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode)
    if mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, loader = wrapped
    else:
        (dp_model, dp_optimizer, loader), dp_criterion = wrapped, criterion
    if physical:
        loader = wrap_data_loader(data_loader=loader, max_batch_size=physical,
                                  optimizer=dp_optimizer)
    for input_ids, mask, y in loader:
        dp_optimizer.zero_grad()
        dp_criterion(forward_logits(dp_model, input_ids, mask), y).backward()
        dp_optimizer.step()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}


@pytest.mark.parametrize(("trainable", "pooling"), [("all", "cls"), ("top-k", "cls"),
                                                     ("all", "mean")])
def test_ghost_clipping_matches_per_sample_hooks(tiny_bert, trainable, pooling):
    model, data = _model(tiny_bert, trainable, pooling), _data()
    # A small norm makes every per-example gradient hit the clip.
    reference = _clipped_gradients(model, data, "hooks", max_grad_norm=0.05)
    ghost = _clipped_gradients(model, data, "ghost", max_grad_norm=0.05)
    assert reference.keys() == ghost.keys() and len(reference) > 2
    for name, step in reference.items():
        assert torch.allclose(ghost[name], step, rtol=1e-4, atol=1e-7), name
    total = torch.sqrt(sum((s ** 2).sum() for s in reference.values()))
    assert 0 < total <= 0.05 + 1e-6  # the mean of clipped gradients is within the clip


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_small_physical_batches_give_the_logical_batch_step(tiny_bert, mode):
    model, data = _model(tiny_bert, "top-k"), _data()
    whole = _clipped_gradients(model, data, mode, max_grad_norm=0.05)
    split = _clipped_gradients(model, data, mode, max_grad_norm=0.05, physical=5)
    for name, step in whole.items():
        assert torch.allclose(split[name], step, rtol=1e-4, atol=1e-7), name


def test_private_training_counts_logical_steps_with_physical_batches(tiny_bert):
    data = _data(n=40)
    steps = []
    for physical in (0, 4):
        cfg = FedsiloConfig.from_flat({"model": str(tiny_bert), "trainable": "top-k",
                                       "top-k": 1, "batch-size": 10,
                                       "physical-batch-size": physical})
        plan = privacy.plan(num_examples=40, batch_size=10, local_epochs=1, num_rounds=1,
                            target_epsilon=8.0, delta=1e-3, accountant="rdp")
        accountant = RDPAccountant()
        result = train_private(_model(tiny_bert, "top-k"), data, cfg, plan, accountant,
                               torch.device("cpu"))
        steps.append(result.steps)
        assert result.steps == sum(s for _, _, s in accountant.history)
    assert steps[0] == steps[1] == 4  # 1 / q logical steps, however they are split
