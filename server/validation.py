"""Checks on every institution's update before it is aggregated.

A reply is rejected, with a reason the report keeps, when its tensors are missing or
extra, have the wrong shape or dtype, hold NaN or Inf, or move a coordinate further
than local training could. The bound follows from the optimiser, not from the data:
AdamW moves a coordinate by at most ``lr · (1 − β1) / √(1 − β2)`` per step from its
normalised gradient (Kingma & Ba, 2015, §2.1; 3.16·lr at the default betas), plus
``lr · weight_decay · |θ|`` from decay, over at most ``local-epochs · ⌈n / batch⌉``
steps; fedsilo allows ``SLACK`` times that. DP clipping bounds the gradients, and
hence the direction of each step, but under Adam it is the optimiser that bounds the
step size, so this is the bound an honest institution can never exceed. Plain SGD's
step is the gradient itself: only DP-SGD bounds it (:func:`max_sgd_change`); SGD
without record-level DP has no coordinate bound, only the structural checks.
"""

from __future__ import annotations

import math

import numpy as np

#: AdamW defaults of ``client.train`` (betas, weight decay).
BETA1, BETA2, WEIGHT_DECAY = 0.9, 0.999, 0.01
#: Safety factor over the bound (float rounding, Poisson step counts).
SLACK = 2.0


def max_coordinate_change(learning_rate: float, steps: int, largest_weight: float) -> float:
    """Largest change of one coordinate that ``steps`` AdamW steps can make."""
    per_step = learning_rate * (max((1 - BETA1) / math.sqrt(1 - BETA2), 1.0)
                                + WEIGHT_DECAY * (largest_weight + 1.0))
    return SLACK * steps * per_step


#: Gaussian noise beyond this many standard deviations counts as impossible (below
#: 2e-23 per coordinate and step).
NOISE_SIGMAS = 10.0


def max_sgd_change(learning_rate: float, steps: int, num_examples: int, batch_size: int,
                   max_grad_norm: float, noise_multiplier: float,
                   largest_correction: float = 0.0) -> float:
    """Largest change of one coordinate that ``steps`` DP-SGD steps (plain SGD) can make.

    A step moves a coordinate by ``lr`` times (clipped sum + noise) / expected batch:
    at most ``n · C`` from the clipped gradients of a Poisson batch and
    ``NOISE_SIGMAS · σ · C`` from the noise, plus ``lr · |c − c_i|`` under SCAFFOLD.
    """
    per_step = learning_rate * (max_grad_norm * (num_examples + NOISE_SIGMAS * noise_multiplier)
                                / batch_size + largest_correction)
    return SLACK * steps * per_step


def planned_steps(num_examples: int, batch_size: int, local_epochs: int) -> int:
    """Most optimiser steps one round can take (Poisson: about ``n / batch`` per epoch)."""
    return local_epochs * max(math.ceil(num_examples / batch_size), 1)


def check_update(received: dict[str, np.ndarray], sent: dict[str, np.ndarray],
                 max_change: float | None) -> str | None:
    """Return why ``received`` cannot be aggregated against ``sent``, or None if it can.

    ``max_change`` None skips the coordinate bound (plain SGD without DP-SGD).
    """
    missing, extra = sorted(set(sent) - set(received)), sorted(set(received) - set(sent))
    if missing or extra:
        return f"tensors differ from the global model: missing {missing[:3]}, extra {extra[:3]}"
    for name, value in received.items():
        expected = sent[name]
        if value.shape != expected.shape:
            return f"tensor {name!r} has shape {value.shape}, expected {expected.shape}"
        if value.dtype != expected.dtype:
            return f"tensor {name!r} has dtype {value.dtype}, expected {expected.dtype}"
        if not np.all(np.isfinite(value)):
            return f"tensor {name!r} holds NaN or Inf"
        if max_change is None or not value.size:
            continue
        change = float(np.max(np.abs(value.astype(np.float64) - expected)))
        if change > max_change:
            return (f"tensor {name!r} moved a coordinate by {change:.3g}, more than local "
                    f"training can ({max_change:.3g})")
    return None
