"""Ghost clipping (the default) computes the same clipped gradients as per-sample hooks."""

import copy

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.common.config import ModelConfig
from fedsilo.common.data import LabelMap
from fedsilo.common.model import forward_logits, load_model


def _clipped_gradients(model: nn.Module, data: TensorDataset, mode: str,
                       max_grad_norm: float) -> dict[str, torch.Tensor]:
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
    for input_ids, mask, y in loader:
        dp_optimizer.zero_grad()
        dp_criterion(forward_logits(dp_model, input_ids, mask), y).backward()
        dp_optimizer.step()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}


@pytest.mark.parametrize("trainable", ["all", "top-k"])
def test_ghost_clipping_matches_per_sample_hooks(tiny_bert, trainable):
    torch.manual_seed(0)
    labels = LabelMap.from_names(["a", "b", "c"])
    model = load_model(ModelConfig(model=str(tiny_bert), trainable=trainable, top_k=1),
                       labels, seed=0)
    n, length = 12, 10
    ids = torch.randint(1000, 5000, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, 7:] = 0  # some padding
    data = TensorDataset(ids, mask, torch.randint(0, 3, (n,)))
    # A small norm makes every per-example gradient hit the clip.
    reference = _clipped_gradients(model, data, "hooks", max_grad_norm=0.05)
    ghost = _clipped_gradients(model, data, "ghost", max_grad_norm=0.05)
    assert reference.keys() == ghost.keys() and len(reference) > 2
    for name, step in reference.items():
        assert torch.allclose(ghost[name], step, rtol=1e-4, atol=1e-7), name
    total = torch.sqrt(sum((s ** 2).sum() for s in reference.values()))
    assert 0 < total <= 0.05 + 1e-6  # the mean of clipped gradients is within the clip
