"""What travels between an institution and the coordinator, and how big it is."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

#: Reply record naming the institution that sent it (a ConfigRecord with ``name``).
INSTITUTION_KEY = "institution"
#: Error code of a reply by which an institution declines a round (budget, policy).
DECLINED_CODE = 4100
#: Error code of a reply whose update SecAgg+ could not represent (range, weight).
SECAGG_RANGE_CODE = 4101
#: Error code of a reply to a message the institution could not process; the
#: details stay in the institution's own log, never in the reply.
FAILED_CODE = 4102
#: Error code of a reply refusing a received model that is not finite or lies outside
#: the agreed bounds (:mod:`fedsilo.client.received`); the institution journals it.
REFUSED_MODEL_CODE = 4103
#: Metric every reply carries under client-level DP: Flower's accountant needs a
#: uniform average, so each institution weighs 1.
UNIFORM_WEIGHT_KEY = "uniform-weight"
#: Config key of every message naming the run across resumptions (the first Flower
#: run id); institutions key their ledger rounds by it.
RUN_KEY = "fedsilo-run"
#: Train-config flag (``--fused-evaluation``): before training, evaluate the received
#: global model on the local test split and reply with its metrics beside the update.
EVALUATE_RECEIVED_KEY = "evaluate-received"
#: Prefix of those metrics in the train reply's MetricRecord (Flower's strategies take
#: exactly one MetricRecord per reply): ``received-accuracy``, ``received-loss``...
RECEIVED_PREFIX = "received-"
#: Train-message record (``--strategy scaffold``): the institution's drift correction
#: ``c − c_i``, float32 tensors named as the trainable ones, applied after each local step.
CORRECTION_KEY = "scaffold-correction"
#: Train-config key of a SecAgg+ round (:mod:`fedsilo.server.secagg`): the names of the
#: tensors, which Flower's legacy layout sends unnamed, in their order.
TENSOR_NAMES_KEY = "tensor-names"


def named_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The tensors of ``record`` as numpy arrays by name."""
    return dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))


def array_record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the tensors in ``record`` (what the update costs on the wire)."""
    return sum(len(array.data) for array in record.values())
