"""An error reply carries a code and a generic reason; the details stay at the institution.

A hostile coordinator reads every error reply. Flower puts an exception's text into the
reply, so a failure while loading the data would send the data file's path, its
per-label row counts or a traceback. Each failure must instead answer with a code and
a fixed reason, and log the details in the institution's own log.
"""

import csv

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client import client_app
from fedsilo.client.messages import GENERIC_REASONS
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.task import federation_labels
from fedsilo.common.wire import FAILED_CODE

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


@pytest.fixture
def cfg(tiny_bert, tmp_path):
    path = tmp_path / "secret-ward-7" / "notes.csv"
    path.parent.mkdir()
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([f"note {i}", ["a", "b", "rare-diagnosis"][i % 3]] for i in range(30))
    return FedsiloConfig.from_flat({
        "output-dir": str(tmp_path / "out"), "model": str(tiny_bert), "data": str(path),
        "labels": '["a", "b"]', "max-length": 16, "batch-size": 8, "num-rounds": 1,
        "holdout-fraction": 0.0, "partition": "iid"})


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_failure_replies_with_a_code_and_no_data_derived_detail(cfg, kind, logs):
    model = load_model(cfg.model, federation_labels(cfg), cfg.train.seed)
    msg = Message(RecordDict({"arrays": ArrayRecord(get_trainable_state(model)),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type=kind)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=cfg.to_flat())
    handler = client_app.train if kind == "train" else client_app.evaluate_local
    reply = handler(msg, context)  # the data holds a label outside the label map
    assert reply.has_error() and reply.error.code == FAILED_CODE
    reason = reply.error.reason
    assert reason == GENERIC_REASONS[FAILED_CODE]
    for detail in ("secret-ward-7", "notes.csv", "rare-diagnosis", "10 rows", "Traceback",
                   "DataError"):
        assert detail not in reason
    # The institution's own log has the details.
    assert "rare-diagnosis" in logs.text and "Traceback" in logs.text
