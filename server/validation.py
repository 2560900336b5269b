"""Checks on every institution's update before it is aggregated.

A reply is rejected, with a reason the report keeps, when its tensors are missing or
extra, have the wrong shape or dtype, hold NaN or Inf, or move a coordinate further
than local training could (the bound of :mod:`fedsilo.common.bounds`, which the
institution's optimiser obeys).
"""

from __future__ import annotations

import numpy as np


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
