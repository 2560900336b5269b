"""SecAgg+: the coordinator's sum equals the plain weighted mean within the stated error."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat
from transformers import AutoModelForSequenceClassification

from fedsilo.client import secagg
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.task import federation_labels
from fedsilo.common.wire import DECLINED_CODE, FAILED_CODE, TENSOR_NAMES_KEY
from fedsilo.server import checkpoint
from fedsilo.server.secagg import error_bound

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "simulations" / "run_simulation.py"


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


def _context(clipping_range=0.5, max_weight=100.0):
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord(
        {"clipping_range": clipping_range, "max_weight": max_weight})})
    return Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})


def test_an_update_outside_the_quantization_range_is_refused_not_clipped():
    update = [np.array([0.1, -0.2], dtype=np.float32), np.array([[0.49]], dtype=np.float32)]
    secagg.check_secagg_range(_context(), update, 100)  # within range: fine
    update[1][0, 0] = -0.51
    with pytest.raises(secagg.SecAggRangeError, match="--secagg-clipping-range"):
        secagg.check_secagg_range(_context(), update, 100)


def test_more_examples_than_the_max_weight_is_refused():
    update = [np.zeros(3, dtype=np.float32)]
    with pytest.raises(secagg.SecAggRangeError, match="--secagg-max-weight"):
        secagg.check_secagg_range(_context(max_weight=100.0), update, 101)


def test_error_replies_pass_through_the_secagg_mod(monkeypatch):
    """Flower's mod reads the app's reply content, which an error reply lacks."""
    def flower_like_mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        _ = reply.content  # raises for an error reply, as Flower's mod does
        return reply

    monkeypatch.setattr(secagg, "secaggplus_mod", flower_like_mod)
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(2)]), {
        TENSOR_NAMES_KEY: ["w"], "server-round": 1}), True)  # the training stage's layout
    content[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "x"})
    msg = Message(content, dst_node_id=1, message_type="train")
    declined = Error(code=DECLINED_CODE, reason="hospital-a: declined: budget")
    reply = secagg.secagg_mod(msg, _context(), lambda m, c: Message(declined, reply_to=m))
    assert reply.has_error() and reply.error.code == DECLINED_CODE
    assert reply.error.reason == "hospital-a: declined: budget"


def test_a_legacy_layout_message_outside_a_secagg_round_is_refused(monkeypatch):
    """Only the SecAgg+ adapter translates Flower's legacy layout; nothing else reads it."""
    from fedsilo.client import client_app, handlers

    monkeypatch.setattr(handlers, "_setup", lambda *a, **k: pytest.fail("the message was read"))
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(2)]), {
        TENSOR_NAMES_KEY: ["w"], "server-round": 1}), True)  # no SecAgg+ stage around it
    reply = secagg.secagg_mod(Message(content, dst_node_id=1, message_type="train"),
                              _context(), client_app.train)
    assert reply.has_error() and reply.error.code == FAILED_CODE
    assert "Message-API" not in reply.error.reason  # the reason stays generic


def test_the_error_bound_shrinks_with_weight_and_grows_with_range():
    assert error_bound(4.0, [100, 100], 1000) < error_bound(4.0, [10, 10], 1000)
    assert error_bound(1.0, [100, 100], 1000) < error_bound(4.0, [100, 100], 1000)


def test_secagg_is_refused_with_server_optimizers_and_with_client_level_dp():
    for strategy in ("fedadam", "fedavgm"):
        with pytest.raises(ConfigError, match=f"fedavg only \\(got --strategy {strategy}"):
            FedsiloConfig.from_flat({"secure-aggregation": True, "strategy": strategy})
    with pytest.raises(ConfigError, match="--dp-level client"):
        FedsiloConfig.from_flat({"secure-aggregation": True, "dp-level": "client"})


@pytest.mark.slow
def test_secagg_aggregate_equals_the_plain_weighted_mean(tiny_bert, tmp_path):
    """A real simulated federation with SecAgg+ and DP-SGD.

    Each institution keeps what it released (its update, before masking); the final
    model must equal the initial tensors plus, per round, the example-weighted mean
    of those updates, within the quantization error bound of each round. The round is
    the plain one's: federated (fused) evaluation every round, a checkpoint after each.
    """
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--institutions", "2", "--num-rounds", "2",
         "--model", str(tiny_bert), "--trainable", "top-k", "--top-k", "1",
         "--max-examples", "300", "--batch-size", "32", "--max-length", "16",
         "--secure-aggregation", "--secagg-max-weight", "1000", "--keep-updates",
         "--target-epsilon", "6", "--evaluate-every", "1", "--fused-evaluation",
         "--output-dir", str(out)],
        cwd=tmp_path, text=True, capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["status"] == "completed"
    cfg = FedsiloConfig.from_flat(doc["config"])
    expected = {k: v.double().numpy() for k, v in get_trainable_state(
        load_model(cfg.model, federation_labels(cfg), cfg.train.seed)).items()}
    tolerance = 0.0
    for server_round in (1, 2):
        entry = doc["rounds"][server_round]
        assert set(entry["institutions"]) == {"institution-0", "institution-1"}
        assert all(0 < i["epsilon"] <= 6 for i in entry["institutions"].values())
        files = sorted(glob.glob(str(out / "ledgers" / "*" / "*" / "released" /
                                     f"*-round-{server_round}.npz")))
        assert len(files) == 2
        updates = [np.load(f) for f in files]
        weights = [int(u["__num_examples__"]) for u in updates]
        for key in expected:
            expected[key] = expected[key] + sum(
                w * u[key].astype(np.float64) for w, u in zip(weights, updates, strict=True)
            ) / sum(weights)
        tolerance += error_bound(cfg.federation.secagg_clipping_range, weights,
                                 cfg.federation.secagg_max_weight)
    final = dict(AutoModelForSequenceClassification.from_pretrained(out / "model")
                 .named_parameters())
    worst = max(float(np.abs(final[k].detach().double().numpy() - v).max())
                for k, v in expected.items())
    moved = max(float(np.abs(v - get_trainable_state(load_model(
        cfg.model, federation_labels(cfg), cfg.train.seed))[k].double().numpy()).max())
        for k, v in expected.items())
    assert worst <= tolerance + 1e-6, (worst, tolerance)
    assert tolerance < moved / 100  # the bound is small next to the updates themselves
    assert all(doc["rounds"][r]["federated_eval"]["num_examples"] > 0 for r in (1, 2))
    assert checkpoint.load(out).server_round == 2  # --resume continues from here
    # Every ledger counts each round once.
    for ledger in glob.glob(str(out / "ledgers" / "*" / "*" / "*.json")):
        rounds = [e["round"] for e in json.loads(Path(ledger).read_text())["entries"]]
        assert rounds == [1, 2]
