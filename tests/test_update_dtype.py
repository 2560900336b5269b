"""Half-precision updates: half the bytes, float32 aggregation, bounded rounding error."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsilo.client.messages import Request, released_arrays
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.server.gate import decode

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_float16_round_trip_error_is_within_half_precision_of_the_update():
    rng = np.random.default_rng(0)
    received = {"w": rng.normal(0, 0.05, (64, 32)).astype(np.float32),
                "b": rng.normal(0, 0.05, 32).astype(np.float32)}
    trained = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32)
               for k, v in received.items()}
    request = Request(received, {})
    wire = released_arrays(request, trained, received, "float16")
    assert all(a.dtype == np.float16 for a in wire.values())
    assert sum(a.nbytes for a in wire.values()) * 2 == sum(a.nbytes for a in trained.values())

    decoded = decode(wire, received)
    for key, value in decoded.items():
        assert value.dtype == np.float32
        delta = np.abs(trained[key] - received[key])
        # float16 keeps 11 significant bits; then one float32 addition.
        bound = delta * 2.0**-11 + 2.0**-25 + np.abs(trained[key]) * 2.0**-23
        assert np.all(np.abs(value - trained[key]) <= bound)
        assert np.abs(value - trained[key]).max() > 0  # it really went through float16


def test_float32_replies_are_aggregated_unchanged():
    received = {"w": np.ones((2, 2), dtype=np.float32)}
    out = decode({"w": received["w"] * 3}, received)["w"]
    assert np.array_equal(out, received["w"] * 3)


def test_the_client_sends_half_precision_when_asked(tiny_bert, tmp_path, train_round):
    cfg = FedsiloConfig.from_flat({
        "output-dir": str(tmp_path), "model": str(tiny_bert), "trainable": "top-k",
        "top-k": 1, "max-examples": 60, "batch-size": 20, "holdout-fraction": 0.0,
        "partition": "iid", "max-length": 16, "update-dtype": "float16"})
    sent, reply = train_round(cfg)
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == list(sent)
    assert {a.dtype for a in arrays.values()} == {"float16"}


def test_float16_is_refused_where_it_would_be_wrong_or_moot():
    with pytest.raises(ConfigError, match="secure-aggregation"):
        FedsiloConfig.from_flat({"update-dtype": "float16", "secure-aggregation": True})
    with pytest.raises(ConfigError, match="update-clipping"):
        FedsiloConfig.from_flat({"update-dtype": "float16", "dp-level": "client"})
    FedsiloConfig.from_flat({"update-dtype": "float16", "dp-level": "client",
                             "update-clipping": "coordinator"})
