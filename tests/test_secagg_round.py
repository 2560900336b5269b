"""SecAgg+ is an adapter of the one round loop: same replies, gate, evaluation, checkpoint."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from support import strategy_for

from fedsilo.common.config import FedsiloConfig
from fedsilo.common.wire import INSTITUTION_KEY, TENSOR_NAMES_KEY
from fedsilo.server.rounds import run_rounds
from fedsilo.server.secagg import SecAggGrid

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task

SENT = {"w": np.full((3, 2), 0.5, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
#: node → (examples claimed, its update); the protocol reveals only their weighted mean.
UPDATES = {1: (100, {"w": np.full((3, 2), 0.1), "b": np.full(2, -0.2)}),
           2: (300, {"w": np.full((3, 2), -0.3), "b": np.full(2, 0.2)})}


class EvaluateGrid:
    """Two connected nodes; evaluate messages are answered, anything else is an error."""

    def __init__(self):
        self.evaluated: list[int] = []

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        assert all(m.metadata.message_type == "evaluate" for m in messages)
        self.evaluated.append(int(messages[0].content["config"]["server-round"]))
        return [Message(RecordDict({"metrics": MetricRecord({
            "num-examples": 10, "loss": 1.0, "accuracy": 0.5})}), reply_to=m) for m in messages]


def fake_protocol(asked: list[dict]):
    """Flower's SecAggPlusWorkflow as the strategy sees it: configure_fit in, sums out."""
    def run(grid, legacy):
        server_round = legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
        params = compat.arrayrecord_to_parameters(
            legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        chosen = legacy.strategy.configure_fit(server_round, params, legacy.client_manager)
        asked.append({proxy.node_id: dict(ins.config) for proxy, ins in chosen})
        names = chosen[0][1].config[TENSOR_NAMES_KEY]
        total = sum(n for n, _ in UPDATES.values())
        mean = [sum(n * u[k] for n, u in UPDATES.values()) / total for k in names]
        results = [(proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean),
                                  UPDATES[proxy.node_id][0], {
                                      "num-examples": UPDATES[proxy.node_id][0], "steps": 3,
                                      "epsilon": 1.0, "delta": 1e-5, "noise-multiplier": 1.0,
                                      "sample-rate": 0.1,
                                      INSTITUTION_KEY: f"site-{proxy.node_id}"}))
                   for proxy, _ in chosen]
        legacy.strategy.aggregate_fit(server_round, results, [])
    return run


def _federation(tmp_path, **flags):
    cfg = FedsiloConfig.from_flat({"output-dir": str(tmp_path), "secure-aggregation": True,
                                   "num-rounds": 5, "evaluate-every": 2, "min-train": 2,
                                   "min-available": 2, **flags})
    strategy = strategy_for(cfg, tmp_path)
    inner, asked = EvaluateGrid(), []
    grid = SecAggGrid(inner, Context(run_id=9, node_id=0, node_config={}, state=RecordDict(),
                                     run_config={}), cfg.federation, strategy.absorb_unmasked)
    grid.workflow = fake_protocol(asked)
    return cfg, strategy, grid, inner, asked


def test_secagg_rounds_run_in_the_one_round_loop(tmp_path):
    cfg, strategy, grid, inner, asked = _federation(tmp_path)
    ended = []
    final = run_rounds(strategy, grid, ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                       first=1, last=5, run_key=7, timeout=1, evaluate_every=2,
                       end_of_round=lambda r, _: ended.append(r))
    assert ended == [1, 2, 3, 4, 5]  # centralized evaluation, report and checkpoint
    assert inner.evaluated == [2, 4, 5]  # the plain round's evaluate messages
    # Each institution got the round's config and the tensor names, in the sent order.
    assert asked[0][1]["fedsilo-run"] == 7 and asked[0][1][TENSOR_NAMES_KEY] == ["w", "b"]
    got = dict(zip(final.keys(), final.to_numpy_ndarrays(), strict=True))
    for key, value in SENT.items():  # five rounds of the weighted mean update
        step = sum(n * u[key] for n, u in UPDATES.values()) / 400
        np.testing.assert_allclose(got[key], value + 5 * step, rtol=1e-6)
        assert got[key].dtype == np.float32
    rounds = {r["round"]: r for r in strategy.report.doc["rounds"]}
    assert sorted(rounds[1]["institutions"]) == ["site-1", "site-2"]
    assert rounds[2]["federated_eval"]["num_examples"] == 20
    events = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [e["update"] for e in events if e["event"] == "received"][:2] == ["masked"] * 2
    assert sum(e["event"] == "unmasked" for e in events) == 5


def test_a_rejected_masked_contribution_discards_the_rounds_sum(tmp_path):
    """The gate cannot take one update out of a sum: the whole round is left out."""
    cfg, strategy, grid, _, _ = _federation(tmp_path, **{"max-examples": 200})  # 300 claimed
    final = run_rounds(strategy, grid, ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                       first=1, last=1, run_key=7, timeout=1, evaluate_every=0,
                       end_of_round=lambda r, _: None)
    got = dict(zip(final.keys(), final.to_numpy_ndarrays(), strict=True))
    for key, value in SENT.items():
        np.testing.assert_array_equal(got[key], value)  # the model stays as sent
    [entry] = [r for r in strategy.report.doc["rounds"] if r["round"] == 1]
    assert any("discarded the round's SecAgg+ sum" in f and "site-2" in f
               for f in entry["failures"]), entry
    assert "site-1" in entry["institutions"]
