"""Local training of one round: Opacus DP-SGD (default) or plain SGD when DP is off."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from fedsilo.client.bk_clipping import BookKeepingClipper, BookKeepingLoss
from fedsilo.client.finite import finite_clipping, nonfinite_examples
from fedsilo.client.privacy import DPPlan
from fedsilo.common.bounds import BETA1, BETA2, WEIGHT_DECAY, encoder_learning_rate
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.features import logits
from fedsilo.common.model import head_names


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training produced."""

    loss: float
    steps: int


#: A per-step drift correction: ``p -= lr · correction[p]`` after every optimiser step.
Correction = Mapping[nn.Parameter, torch.Tensor]


def _optimizer(model: nn.Module, cfg: FedsiloConfig) -> torch.optim.Optimizer:
    """The local optimiser, new each round (its state is never kept or sent).

    AdamW trains the head at ``--learning-rate`` and the encoder-side tensors at
    ``--encoder-learning-rate`` (the ``--trainable`` recipe's when 0); plain SGD
    trains every tensor at ``--learning-rate``.
    """
    train = cfg.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD([p for _, p in named], lr=train.learning_rate)
    head = head_names(model)
    encoder = encoder_learning_rate(cfg.model.trainable, train.encoder_learning_rate)
    groups = [{"params": [p for n, p in named if n in head], "lr": train.learning_rate},
              {"params": [p for n, p in named if n not in head], "lr": encoder}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.learning_rate,
                             betas=(BETA1, BETA2), weight_decay=WEIGHT_DECAY)


def _correct_steps(optimizer: torch.optim.Optimizer, correction: Correction | None,
                   lr: float) -> RemovableHandle | None:
    """Apply ``correction`` after each step ``optimizer`` takes (SCAFFOLD's ``c − c_i``).

    The hook sits on the torch optimiser itself (inside Opacus's ``DPOptimizer``), so
    it runs once per noised logical step, not per physical batch. The correction is
    the coordinator's, computed from released updates: it costs no privacy.
    """
    if not correction:
        return None
    for param, value in correction.items():
        if value.shape != param.shape:
            raise ValueError(f"the coordinator's correction has shape {tuple(value.shape)} "
                             f"for a tensor of shape {tuple(param.shape)}")
    moved = {p: v.to(device=p.device, dtype=p.dtype) for p, v in correction.items()}

    def step_post_hook(*_: object) -> None:
        with torch.no_grad():
            for param, value in moved.items():
                param.add_(value, alpha=-lr)

    return optimizer.register_step_post_hook(step_post_hook)


def _backward(model: nn.Module, criterion: Callable[..., Any], inputs: list[torch.Tensor],
              y: torch.Tensor) -> Any:
    """One forward and backward pass of a batch; returns the criterion's loss."""
    weight = 1.0
    if not len(y):
        # An empty Poisson batch is still a step (Opacus accounts for it): a
        # zero-weighted placeholder gives every mode a zero gradient sum, so the
        # step is pure noise (BERT cannot run a batch of 0).
        inputs, y, weight = [x.new_zeros((1, *x.shape[1:])) for x in inputs], \
            y.new_zeros(1), 0.0
    loss = criterion(logits(model, *inputs), y)
    (loss * weight).backward()
    return loss


def _run_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[..., Any],
    epochs: int,
    device: torch.device,
    keep: Callable[[Any], torch.Tensor | None] | None = None,
) -> TrainResult:
    """Train ``epochs`` passes over ``loader``; the loss is read back once, at the end.

    ``keep`` (ghost clipping) returns, after a batch's backward pass, the mask of
    examples whose gradient is finite when some is not; the batch is then recomputed
    without the others (their clipped gradient counts as zero).
    """
    total, count, steps = torch.zeros((), device=device), 0, 0
    for _ in range(epochs):
        for *inputs, y in loader:
            optimizer.zero_grad(set_to_none=True)
            inputs = [x.to(device, non_blocking=True) for x in inputs]
            y = y.to(device, non_blocking=True)
            loss = _backward(model, criterion, inputs, y)
            while keep is not None and len(y) and (kept := keep(loss)) is not None:
                optimizer.zero_grad(set_to_none=True)
                inputs, y = [x[kept] for x in inputs], y[kept]
                loss = _backward(model, criterion, inputs, y)
            optimizer.step()
            if len(y):
                total += loss.detach() * len(y)
            count += len(y)
            steps += 1
    return TrainResult(loss=float(total) / max(count, 1), steps=steps)


@dataclass(frozen=True)
class PrivateTraining:
    """What DP-SGD trains with: the model, optimizer, criterion and loader to use."""

    model: nn.Module
    optimizer: DPOptimizer
    criterion: Callable[..., Any]
    loader: DataLoader
    close: Callable[[], None]
    #: Ghost clipping: the examples to keep after a backward pass (see :func:`_run_epochs`).
    keep: Callable[[Any], torch.Tensor | None] | None = None


def make_private(
    engine: PrivacyEngine,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    mode: str,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
) -> PrivateTraining:
    """Opacus's ``make_private`` for any ``--grad-sample-mode``, book-keeping included.

    ``bk`` sets up Opacus's ghost-clipping optimizer, Poisson loader and accountant
    hook, then replaces ghost clipping's two backward passes with
    :class:`~fedsilo.client.bk_clipping.BookKeepingClipper`'s one. In every mode an
    example whose gradient is not finite contributes zero (:mod:`fedsilo.client.finite`).
    """
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
            grad_sample_mode="ghost" if mode == "bk" else mode)
    if mode == "bk":
        dp_model, dp_optimizer, _, dp_loader = wrapped
        dp_model._close()  # Opacus's ghost-clipping hooks off: book-keeping clips instead
        clipper = BookKeepingClipper(model, max_grad_norm)
        return PrivateTraining(model, dp_optimizer, BookKeepingLoss(clipper, criterion),
                               dp_loader, clipper.close)
    if mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, dp_loader = wrapped
        return PrivateTraining(dp_model, dp_optimizer, dp_criterion, dp_loader, dp_model._close,
                               lambda loss: nonfinite_examples(dp_model, loss.loss_per_sample))
    (dp_model, dp_optimizer, dp_loader), dp_criterion = wrapped, criterion
    return PrivateTraining(dp_model, finite_clipping(dp_optimizer), dp_criterion, dp_loader,
                           dp_model._close)


def train_private(
    model: nn.Module,
    dataset: TensorDataset,
    cfg: FedsiloConfig,
    dp_plan: DPPlan,
    accountant: IAccountant,
    device: torch.device,
    correction: Correction | None = None,
) -> TrainResult:
    """Run the round's local epochs of DP-SGD; ``accountant`` records the steps.

    ``model`` must be the unwrapped classifier (or its :class:`~fedsilo.common.features.Head`
    with a feature dataset); it is trained in place, with ``correction`` applied after
    every noised step (``--strategy scaffold``). The global
    RNG is reseeded from the OS first so that the noise and the Poisson sampling are
    not predictable from the run's (shared) seed.
    """
    torch.seed()
    model.to(device).train()  # Opacus needs train mode before make_private
    engine = PrivacyEngine(accountant=accountant.mechanism())
    engine.accountant = accountant
    private = make_private(
        engine, model, _optimizer(model, cfg), planned_loader(dataset, dp_plan),
        mode=cfg.privacy.grad_sample_mode, noise_multiplier=dp_plan.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm)
    private.optimizer.expected_batch_size = dp_plan.expected_batch_size
    before = _accounted_steps(accountant)
    corrected = None
    try:
        corrected = _correct_steps(private.optimizer.original_optimizer, correction,
                                   cfg.train.learning_rate)
        if cfg.train.physical_batch_size:
            with BatchMemoryManager(data_loader=private.loader, optimizer=private.optimizer,
                                    max_physical_batch_size=cfg.train.physical_batch_size
                                    ) as physical:
                result = _run_epochs(private.model, physical, private.optimizer,
                                     private.criterion, cfg.train.local_epochs, device,
                                     private.keep)
        else:
            result = _run_epochs(private.model, private.loader, private.optimizer,
                                 private.criterion, cfg.train.local_epochs, device, private.keep)
    finally:
        private.close()  # remove the hooks so `model` is a plain module again
        if corrected is not None:
            corrected.remove()
    # Logical (noised) steps, as the accountant counted them; physical batches are not steps.
    return TrainResult(loss=result.loss, steps=_accounted_steps(accountant) - before)


def planned_loader(dataset: TensorDataset, dp_plan: DPPlan) -> DataLoader:
    """A loader Opacus turns into Poisson sampling at the plan's rate, for the plan's steps.

    Opacus takes the sample rate and the steps per epoch from ``len(loader)`` and never
    iterates the loader itself; sizing it from the plan (not from ``len(dataset)``) keeps
    the exact local count out of the steps, the rate and the expected batch when the
    institution declares its count (``declared-examples``).
    """
    steps_per_epoch = round(1 / dp_plan.sample_rate)
    return DataLoader(dataset, batch_sampler=[[0]] * steps_per_epoch)


def _accounted_steps(accountant: IAccountant) -> int:
    return sum(int(steps) for _, _, steps in accountant.history)


def train_plain(
    model: nn.Module, dataset: TensorDataset, cfg: FedsiloConfig, device: torch.device,
    correction: Correction | None = None,
) -> TrainResult:
    """Run the round's local epochs without differential privacy.

    ``correction`` is applied after every step, as in :func:`train_private`.
    """
    model.to(device).train()
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True)
    optimizer = _optimizer(model, cfg)
    corrected = _correct_steps(optimizer, correction, cfg.train.learning_rate)
    try:  # a plain module: nothing to undo if the correction is refused above
        return _run_epochs(model, loader, optimizer, nn.CrossEntropyLoss(),
                           cfg.train.local_epochs, device)
    finally:
        if corrected is not None:
            corrected.remove()
