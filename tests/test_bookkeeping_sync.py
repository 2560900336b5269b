"""Book-keeping's step never waits on the device: no value is read back to the host."""

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.client.train import make_private
from fedsilo.common.config import ModelConfig
from fedsilo.common.features import logits
from fedsilo.common.model import load_model
from fedsilo.common.records import LabelMap

#: What reads a tensor's value on the host (a CUDA synchronisation on a GPU).
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("trainable", ["all", "lora", "classifier"])
def test_the_clipped_noised_step_reads_nothing_back(tiny_bert, monkeypatch, trainable):
    model = load_model(ModelConfig(model=str(tiny_bert), trainable=trainable),
                       LabelMap.from_names(["a", "b"]), seed=0).train()
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(1000, 5000, (6, 8)), torch.ones(6, 8, dtype=torch.long),
                         torch.randint(0, 2, (6,)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    private = make_private(PrivacyEngine(), model, optimizer, DataLoader(data, batch_size=6),
                           mode="bk", noise_multiplier=1.0, max_grad_norm=1.0,
                           poisson_sampling=False)
    *inputs, y = next(iter(private.loader))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss = private.criterion(logits(private.model, *inputs), y)  # the forward may branch

    def read(*_: object, **__: object) -> None:
        raise AssertionError("the step read a tensor's value on the host")

    with monkeypatch.context() as patched:
        for name in READS:
            patched.setattr(torch.Tensor, name, read)
        loss.backward()  # per-example norms, the clipped sum
        private.optimizer.pre_step()  # Opacus: noise, scaling, accountant hook
    private.optimizer.original_optimizer.step()
    private.close()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_the_read_guard_catches_a_branch_on_a_value(monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "__bool__", lambda *_: (_ for _ in ()).throw(
            AssertionError("read")))
        with pytest.raises(AssertionError, match="read"):
            if torch.ones(1) > 0:
                pass
