"""Book-keeping (the default) and ghost clipping give the same clipped step as per-sample hooks."""

import copy

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.client import privacy
from fedsilo.client.bk_clipping import BookKeepingClipper
from fedsilo.client.train import _run_epochs, make_private, train_private
from fedsilo.common.config import FedsiloConfig, ModelConfig
from fedsilo.common.features import Head
from fedsilo.common.model import forward_logits, load_model
from fedsilo.common.records import LabelMap


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
    private = make_private(PrivacyEngine(), model, optimizer,
                           DataLoader(data, batch_size=len(data)), mode=mode,
                           noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                           poisson_sampling=False)
    loader = private.loader
    if physical:
        loader = wrap_data_loader(data_loader=loader, max_batch_size=physical,
                                  optimizer=private.optimizer)
    for input_ids, mask, y in loader:
        private.optimizer.zero_grad()
        private.criterion(forward_logits(private.model, input_ids, mask), y).backward()
        private.optimizer.step()
    private.close()
    assert all(p.requires_grad for n, p in model.named_parameters() if n in before)
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize(("trainable", "pooling"), [("all", "cls"), ("top-k", "cls"),
                                                     ("all", "mean"), ("lora", "mean"),
                                                     ("classifier", "cls")])
def test_clipping_matches_per_sample_hooks(tiny_bert, trainable, pooling, mode):
    model, data = _model(tiny_bert, trainable, pooling), _data()
    # A small norm makes every per-example gradient hit the clip.
    reference = _clipped_gradients(model, data, "hooks", max_grad_norm=0.05)
    step = _clipped_gradients(model, data, mode, max_grad_norm=0.05)
    assert reference.keys() == step.keys() and len(reference) >= 2
    for name, expected in reference.items():
        assert torch.allclose(step[name], expected, rtol=1e-4, atol=1e-7), name
    total = torch.sqrt(sum((s ** 2).sum() for s in reference.values()))
    assert 0 < total <= 0.05 + 1e-6  # the mean of clipped gradients is within the clip


def test_book_keeping_leaves_small_gradients_unclipped(tiny_bert):
    model, data = _model(tiny_bert, "top-k"), _data()
    # A norm far above every per-example gradient: the step is the plain mean gradient.
    clipped = _clipped_gradients(model, data, "bk", max_grad_norm=1e6)
    plain = copy.deepcopy(model).train()
    for module in plain.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    nn.functional.cross_entropy(forward_logits(plain, *data.tensors[:2]), data.tensors[2]
                                ).backward()
    for name, p in plain.named_parameters():
        if name in clipped:
            assert torch.allclose(clipped[name], p.grad, rtol=1e-4, atol=1e-7), name


def test_book_keeping_rejects_unsupported_and_shared_layers(tiny_bert):
    conv = nn.Sequential(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="--grad-sample-mode bk.*Conv1d.*ghost"):
        BookKeepingClipper(conv, 1.0)
    layer = nn.Linear(3, 3)
    shared = nn.Sequential(layer, nn.ReLU(), layer).train()
    clipper = BookKeepingClipper(shared, 1.0)
    with pytest.raises(NotImplementedError,
                       match=r"0 \(Linear\) runs twice.*--grad-sample-mode hooks"):
        shared(torch.ones(2, 3))
    assert layer.weight.requires_grad  # nothing left frozen by the failed step
    clipper.close()


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
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


def test_book_keeping_empty_batch_gives_zero_gradients(tiny_bert):
    head = Head(_model(tiny_bert, "classifier", "cls")).train()  # what a federation trains
    clipper = BookKeepingClipper(head, 1.0)
    features = torch.zeros(0, head.classifier.in_features)  # Poisson sampling drew no example
    losses = nn.functional.cross_entropy(head(features), torch.zeros(0, dtype=torch.long),
                                         reduction="none")
    clipper.backward(losses)
    clipper.close()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


class _Toy(nn.Module):
    """Every layer type book-keeping supports, on token sequences with padding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.hidden = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.norm(self.embed(ids))))).mean(1)


def test_book_keeping_matches_a_per_example_loop():
    """Independent of Opacus: clip each example's own gradient, sum, compare."""
    torch.manual_seed(1)
    model = _Toy().train()
    model.hidden.weight.requires_grad_(False)  # a layer that trains its bias only
    ids = torch.randint(1, 20, (6, 5))
    ids[0, 3:] = 0  # padding
    ids[1, :] = 7  # one token repeated: its embedding row sums five gradients
    y = torch.randint(0, 3, (6,))
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_example = [torch.autograd.grad(
        nn.functional.cross_entropy(model(ids[i:i + 1]), y[i:i + 1]), trainable)
        for i in range(len(ids))]
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads))
                         for grads in per_example])
    clip = float(norms.median())  # some examples are clipped, some are not
    expected = [sum(grads[k] * min(1.0, clip / (float(n) + 1e-6))
                    for grads, n in zip(per_example, norms, strict=True))
                for k in range(len(trainable))]
    clipper = BookKeepingClipper(model, clip)
    clipper.backward(nn.functional.cross_entropy(model(ids), y, reduction="none"))
    clipper.close()
    assert torch.allclose(clipper.per_sample_norms, norms, rtol=1e-5)
    assert model.hidden.weight.grad is None and not model.hidden.weight.requires_grad
    for p, total in zip(trainable, expected, strict=True):
        assert torch.allclose(p.grad, total, rtol=1e-5, atol=1e-7)
    assert not model.embed.weight.grad[0].any()  # the padding row


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_an_empty_poisson_batch_is_a_pure_noise_step(tiny_bert, mode):
    """BERT cannot run a batch of 0: the step must still happen, with noise only."""
    model, data = _model(tiny_bert, "top-k"), _data()
    empty = [t[:0] for t in data.tensors]  # what Opacus's Poisson loader yields
    moved = []
    for sigma in (0.0, 1.0):
        trained = copy.deepcopy(model).train()
        before = [p.detach().clone() for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad],
                                    lr=1.0)
        private = make_private(PrivacyEngine(), trained, optimizer, DataLoader(data),
                               mode=mode, noise_multiplier=sigma, max_grad_norm=1.0)
        result = _run_epochs(private.model, [empty], private.optimizer, private.criterion,
                             1, torch.device("cpu"))
        private.close()
        assert result.steps == 1 and result.loss == 0.0
        after = [p.detach() for p in trained.parameters() if p.requires_grad]
        moved.append(any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)))
    assert moved == [False, True]  # no gradient from the placeholder; the noise moves it


class _DirectWeight(nn.Module):
    """Uses a trainable layer's weight without calling the layer (as DeBERTa does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 3)
        self.table = nn.Embedding(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inp(x) @ self.table.weight


def test_book_keeping_refuses_weights_used_without_their_layer():
    model = _DirectWeight().train()
    clipper = BookKeepingClipper(model, 1.0)
    out = model(torch.ones(2, 3))
    with pytest.raises(NotImplementedError, match="table did not run.*--trainable"):
        clipper.backward(out.sum(1))
    assert model.table.weight.requires_grad and model.table.weight.grad is None
    clipper.close()
