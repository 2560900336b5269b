"""Rules both sides must agree on: the local optimiser, step counts, δ and update bounds.

The institution trains with these constants and step counts; the coordinator derives
from the same numbers how far an honest update can move a coordinate. Keeping them in
one module means a recipe change moves both sides at once.

AdamW moves a coordinate by at most ``lr · (1 − β1) / √(1 − β2)`` per step from its
normalised gradient (Kingma & Ba, 2015, §2.1; 3.16·lr at the default betas), plus
``lr · weight_decay · |θ|`` from decay, over at most ``local-epochs · ⌈n / batch⌉``
steps; the bound allows ``SLACK`` times that. DP clipping bounds the gradients, and
hence the direction of each step, but under Adam it is the optimiser that bounds the
step size. Plain SGD's step is the gradient itself: only DP-SGD bounds it
(:func:`max_sgd_change`); SGD without record-level DP has no coordinate bound.

Under AdamW the head trains at ``--learning-rate`` and the encoder-side tensors (LoRA
adapters, encoder layers) at ``--encoder-learning-rate``, whose default is the
recipe of their ``--trainable`` set (:data:`ENCODER_LEARNING_RATES`,
docs/fine-tuning.md); the coordinator bounds an update by the larger of the two.
"""

from __future__ import annotations

import math

#: AdamW settings every institution trains with (betas, weight decay).
BETA1, BETA2, WEIGHT_DECAY = 0.9, 0.999, 0.01
#: AdamW learning rate of the encoder-side tensors per ``--trainable`` set when
#: ``--encoder-learning-rate`` is 0 (docs/fine-tuning.md has the measurements).
ENCODER_LEARNING_RATES = {"lora": 1e-3, "top-k": 1e-3, "all": 1e-4}
#: Safety factor over a bound (float rounding, Poisson step counts).
SLACK = 2.0
#: Gaussian noise beyond this many standard deviations counts as impossible (below
#: 2e-23 per coordinate and step).
NOISE_SIGMAS = 10.0


def default_delta(num_examples: int) -> float:
    """δ used when none is set: ``min(1e-5, 0.1 / n)``, always below ``1 / n``."""
    return min(1e-5, 0.1 / num_examples)


def planned_steps(num_examples: int, batch_size: int, local_epochs: int) -> int:
    """Most optimiser steps one round can take (Poisson: about ``n / batch`` per epoch)."""
    return local_epochs * max(math.ceil(num_examples / batch_size), 1)


def encoder_learning_rate(trainable: str, configured: float) -> float:
    """The encoder-side learning rate in force: ``configured``, or the recipe's when 0."""
    return configured or ENCODER_LEARNING_RATES.get(trainable, 0.0)


def largest_learning_rate(head: float, encoder: float) -> float:
    """Largest AdamW learning rate any tensor of any ``--trainable`` set trains at.

    ``encoder`` 0 (the recipes) counts as the largest recipe rate, so the bound does
    not depend on which set the coordinator believes is training.
    """
    return max(head, encoder or max(ENCODER_LEARNING_RATES.values()))


def max_coordinate_change(learning_rate: float, steps: int, largest_weight: float) -> float:
    """Largest change of one coordinate that ``steps`` AdamW steps can make."""
    per_step = learning_rate * (max((1 - BETA1) / math.sqrt(1 - BETA2), 1.0)
                                + WEIGHT_DECAY * (largest_weight + 1.0))
    return SLACK * steps * per_step


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


#: Betas of the coordinator's FedAdam (Flower's defaults, which fedsilo's coordinator keeps).
SERVER_ADAM_BETAS = (0.9, 0.99)
#: Largest difference allowed between the received round-1 model and the agreed initial
#: model each side builds from the pinned checkpoint and seed: another torch build may
#: initialise a new head differently (its entries are about N(0, 0.02)).
INITIAL_TOLERANCE = 1.0


def max_server_step(strategy: str, average_change: float, server_learning_rate: float,
                    server_momentum: float) -> float:
    """Largest change of one coordinate one aggregation of the coordinator's strategy makes.

    ``average_change`` bounds a coordinate of every institution's update, hence of
    their weighted average (FedAvg). FedAvgM and SCAFFOLD keep a velocity
    ``m·v + Δ`` (at most ``Δ / (1 − m)``). FedAdam moves by ``η_t · m / (√v + τ)``,
    with ``|m| / √v ≤ (1 − β1) / (√(1 − β2) (1 − β1 / √β2))`` whatever the updates and
    ``η_t ≤ η / (1 − β1²)`` from round 1 on.
    """
    if strategy == "fedadam":
        b1, b2 = SERVER_ADAM_BETAS
        ratio = (1 - b1) / (math.sqrt(1 - b2) * (1 - b1 / math.sqrt(b2)))
        return SLACK * server_learning_rate * ratio / (1 - b1 ** 2)
    if strategy in ("fedavgm", "scaffold"):
        return average_change / (1 - server_momentum)
    return average_change


def max_received_distance(aggregations: int, learning_rate: float, steps: int,
                          initial_largest: float, strategy: str, server_learning_rate: float,
                          server_momentum: float) -> float:
    """Largest L∞ distance of a global model from the agreed initial one after ``aggregations``.

    Each round every institution's AdamW update moves a coordinate at most
    :func:`max_coordinate_change` (its weight-decay term grows with the weights, so the
    bound is accumulated round by round); the strategy's step is :func:`max_server_step`.
    """
    distance = INITIAL_TOLERANCE
    for _ in range(max(aggregations, 0)):
        change = max_coordinate_change(learning_rate, steps, initial_largest + distance)
        distance += max_server_step(strategy, change, server_learning_rate, server_momentum)
    return distance
