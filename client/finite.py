"""A per-example gradient that is not finite contributes nothing, in every Opacus mode.

A received model can make one record's logits overflow (finite float32 weights near
10³⁷ aimed at it). Opacus clips by multiplying each per-example gradient by
``C / norm``; for that record the norm is inf or NaN and ``0 · inf`` is NaN, so the
clipped sum, and the noised update after it, would be NaN exactly when the record
is in the batch: noise cannot hide a NaN. Here such an example gets zero weight
through ``torch.where`` instead, so the clipped sum (each example's share still at
most ``C``) and the released update stay finite whatever model was received.

- ``hooks``, ``functorch``, ``ew``: :class:`FiniteClipping` replaces Opacus's
  ``DPOptimizer.clip_and_accumulate``.
- ``ghost``: its second backward pass runs through the whole batch's graph, where a
  NaN in one example's activations reaches every weight gradient whatever the
  example's coefficient. :func:`nonfinite_examples` finds such examples after the
  first pass; the training loop then recomputes the batch without them, which is
  the clipped sum with their contribution set to zero.
- ``bk`` masks inside :mod:`fedsilo.client.bk_clipping`, in the same pass.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

#: Added to every norm before dividing, as Opacus does.
_EPS = 1e-6


class FiniteClipping(DPOptimizer):
    """Opacus's ``DPOptimizer`` whose clipping gives a non-finite per-example gradient weight 0."""

    def clip_and_accumulate(self) -> None:
        """Clip per-example gradients to ``max_grad_norm`` and add them to ``p.summed_grad``."""
        samples = self.grad_samples
        if not len(samples[0]):  # an empty Poisson batch
            norms = torch.zeros(0, device=samples[0].device)
        else:
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1).to(samples[0].device)
                                 for g in samples], dim=1).norm(2, dim=1)
        keep = torch.isfinite(norms)
        factor = torch.where(keep, (self.max_grad_norm / (norms + _EPS)).clamp(max=1.0), 0.0)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            sample = self._get_flat_grad_sample(p).to(p.dtype)
            kept = torch.where(keep.to(sample.device).view(-1, *(1,) * (sample.dim() - 1)),
                               sample, 0)
            grad = torch.einsum("i,i...", factor.to(sample.device, p.dtype), kept)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


def finite_clipping(optimizer: DPOptimizer) -> DPOptimizer:
    """Make the ``DPOptimizer`` Opacus's ``make_private`` built clip as :class:`FiniteClipping`.

    Only the clipping method changes (the subclass adds no state), so the
    accountant hook, noise and scaling Opacus attached stay as they are.

    Raises
    ------
    TypeError
        For any other optimizer class (ghost clipping, Opacus's distributed or
        per-layer optimizers), whose clipping this does not replace.
    """
    if type(optimizer) is not DPOptimizer:
        raise TypeError(f"finite clipping replaces DPOptimizer's, not {type(optimizer).__name__}'s")
    optimizer.__class__ = FiniteClipping
    return optimizer


def nonfinite_examples(model: nn.Module, losses: torch.Tensor) -> torch.Tensor | None:
    """After ghost clipping's backward: the mask of examples to keep, or None if all are finite.

    ``model`` is Opacus's ghost-clipping module (its per-example norms of this pass);
    ``losses`` the per-example losses. Waits on the device (a branch on the values):
    ghost clipping is not the GPU-first mode.
    """
    keep = torch.isfinite(model.per_sample_gradient_norms) & torch.isfinite(losses.detach())
    return None if bool(keep.all()) else keep
