"""A hostile coordinator against the institution's privacy budget (issue 25).

The coordinator chooses each run's config. It must not open a fresh ledger by
changing how the institution splits its data (seed, test fraction, max examples), nor
get a run trained on a dataset whose lifetime budget cannot pay the run's agreed ε
(with σ recalibrated to the leftover, as before); a declined run is reported as
completed with declines, naming who declined and why.

The agreement check is the subject of test_agreements.py; here it is stubbed out so
each run reaches the budget.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsilo.client import budget, client_app, handlers
from fedsilo.client.ledger import Ledger
from fedsilo.client.policy import institution_config
from fedsilo.client.privacy import BudgetExceededError
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.splits import local_institution
from fedsilo.common.task import federation_labels, freeze_labels
from fedsilo.common.wire import DECLINED_CODE, RUN_KEY
from fedsilo.server.report import RunReport

N = 60
HOSTILE = [{"seed": 43}, {"test-fraction": 0.11}, {"test-fraction": 0.99},
           {"max-examples": N - 1}]


@pytest.fixture
def site(tmp_path: Path) -> dict[str, object]:
    """An institution's node config: its data file, ledger and a lifetime ε of 10."""
    rng = random.Random(0)
    rows = ["text,label"] + [f"note {i} {rng.random():.6f},{rng.choice(['cardio', 'resp'])}"
                             for i in range(N)]
    (tmp_path / "notes.csv").write_text("\n".join(rows) + "\n", "utf-8")
    return {"institution": "hospital-a", "data": str(tmp_path / "notes.csv"),
            "ledger-dir": str(tmp_path / "ledger"), "lifetime-epsilon": 10.0,
            "deidentify": DeidSettings(kinds=()).to_node()}


@pytest.fixture
def run_cfg(tiny_bert: Path, tmp_path: Path) -> FedsiloConfig:
    return freeze_labels(FedsiloConfig.from_flat({
        "model": str(tiny_bert), "labels": '["cardio", "resp"]', "num-rounds": 1,
        "target-epsilon": 8.0, "batch-size": 16, "output-dir": str(tmp_path / "out")}))


def _key(run: FedsiloConfig, node: dict[str, object]) -> str:
    cfg, _ = institution_config(run, node)
    return budget.raw_fingerprint(cfg, None, local_institution(cfg.data, "h", cfg.train.seed))


@pytest.mark.parametrize("hostile", HOSTILE)
def test_split_settings_from_the_coordinator_keep_the_same_ledger(site, run_cfg, hostile):
    cfg, _ = institution_config(run_cfg.replace(**hostile), site)
    assert all(cfg.to_flat()[k] == FedsiloConfig().to_flat()[k] for k in hostile)
    assert _key(run_cfg.replace(**hostile), site) == _key(run_cfg, site)


def test_the_institution_owns_its_split(site, run_cfg):
    cfg, _ = institution_config(run_cfg.replace(seed=43, test_fraction=0.99),
                                {**site, "seed": 7, "test-fraction": 0.2})
    assert cfg.train.seed == 7 and cfg.data.test_fraction == 0.2


def _train(cfg: FedsiloConfig, node: dict[str, object], run: int) -> Message:
    sent = {k: v.numpy() for k, v in get_trainable_state(
        load_model(cfg.model, federation_labels(cfg), cfg.train.seed)).items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                          "config": ConfigRecord({"server-round": 1, RUN_KEY: run})})
    msg = Message(content, dst_node_id=7, message_type="train")
    context = Context(run_id=run, node_id=7, node_config=node, state=RecordDict(),
                      run_config=cfg.to_flat())
    return client_app.train(msg, context)


@pytest.mark.usefixtures("task_identity")
def test_a_second_run_on_a_nearly_spent_budget_is_declined_and_reported(
        site, run_cfg, tmp_path, monkeypatch, logs):
    monkeypatch.setattr(handlers, "check_run", lambda *a: None)
    first = _train(run_cfg, site, run=1)
    assert not first.has_error(), first.error if first.has_error() else ""
    ledger_dir = Path(str(site["ledger-dir"]))
    [path] = ledger_dir.glob("dataset-*.json")
    spent = Ledger.open(ledger_dir, "x" * 64, "rdp")  # another dataset: untouched, empty
    assert not spent.entries
    report = RunReport(tmp_path / "report", ["cardio", "resp"], run_cfg.to_flat(), 1)
    for run, hostile in enumerate([{}, *HOSTILE], start=2):
        before = path.read_bytes()
        reply = _train(run_cfg.replace(**hostile), site, run=run)
        assert reply.has_error() and reply.error.code == DECLINED_CODE
        assert "budget" in reply.error.reason and "ε=8" in reply.error.reason
        assert path.read_bytes() == before  # declined before any step: nothing recorded
        assert list(ledger_dir.glob("dataset-*.json")) == [path]  # the same ledger
        report.record_train(1, [reply])
    assert "ε" in logs.text and "left" in logs.text  # the institution logs what is left
    report.complete()
    assert report.doc["outcome"] == "completed with declines"
    assert len(report.doc["declines"]) == 1 + len(HOSTILE)
    assert all("hospital-a" in d["reason"] and "budget" in d["reason"]
               for d in report.doc["declines"])


def test_no_recalibration_to_the_leftover(site, run_cfg, tmp_path):
    ledger = Ledger.open(tmp_path, "e" * 64, "rdp", lifetime=10.0)
    ledger.record(1, 1, 100, 0.1, 0.76, 1e-5)  # run 1 spent most of it
    from fedsilo.client import privacy
    plan = privacy.plan(num_examples=N, batch_size=16, local_epochs=1, num_rounds=1,
                        target_epsilon=8.0, delta=1e-5, accountant="rdp")
    with pytest.raises(BudgetExceededError):
        budget.admit(ledger, plan, 2, "hospital-a")


@pytest.mark.usefixtures("task_identity")
def test_a_deleted_ledger_refuses_training_until_the_operator_confirms(
        site, run_cfg, tmp_path, monkeypatch):
    from fedsilo.client import cli

    monkeypatch.setattr(handlers, "check_run", lambda *a: None)
    node = {**site, "lifetime-epsilon": 100.0}
    assert not _train(run_cfg, node, run=1).has_error()
    ledger_dir = Path(str(site["ledger-dir"]))
    [path] = ledger_dir.glob("dataset-*.json")
    path.unlink()  # "spent 0.0" is what today's main would then report
    reply = _train(run_cfg, node, run=2)
    assert reply.has_error() and reply.error.code == DECLINED_CODE
    assert "waiting for its operator" in reply.error.reason
    assert not path.exists()  # nothing trained, nothing recorded
    toml = tmp_path / "client.toml"
    toml.write_text(f'institution = "hospital-a"\nsuperlink = "127.0.0.1:9092"\n'
                    f'data = "{site["data"]}"\nledger-dir = "{ledger_dir}"\n', "utf-8")
    assert cli.main(["ledger", "confirm", "--config", str(toml), "--yes"]) == 0
    assert not _train(run_cfg, node, run=3).has_error()


def test_a_run_without_declines_is_simply_completed(tmp_path):
    report = RunReport(tmp_path, ["cardio", "resp"], {"target-epsilon": 8.0}, 1)
    report.complete()
    assert report.doc["outcome"] == "completed" and report.doc["status"] == "completed"
