"""De-identification in the training path: before tokens and caches, after the fingerprint."""

import csv
import json
import re

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from make_identifiers import KINDS, planted_notes
from transformers import AutoTokenizer

from fedsilo.client import cli, client_app, handlers, runtime_launch
from fedsilo.common import journal
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.task import federation_labels
from fedsilo.common.wire import DECLINED_CODE

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@pytest.fixture(scope="module")
def notes():
    return planted_notes(per_kind=6, seed=11)


@pytest.fixture
def values(notes):
    return [_norm(v) for n in notes for _, v in n.planted if len(_norm(v)) >= 6]


@pytest.fixture
def data_file(tmp_path, notes):
    path = tmp_path / "notes.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([n.text, "ab"[i % 2]] for i, n in enumerate(notes))
    return path


def _cfg(tiny_bert, data_file, out, **flat):
    return FedsiloConfig.from_flat({
        "output-dir": str(out), "model": str(tiny_bert), "data": str(data_file),
        "labels": '["a", "b"]', "max-length": 64, "batch-size": 8, "num-rounds": 1,
        "holdout-fraction": 0.0, "partition": "iid", "test-fraction": 0.2, **flat})


def _train(cfg, node_config):
    model = load_model(cfg.model, federation_labels(cfg), cfg.train.seed)
    content = RecordDict({"arrays": ArrayRecord(get_trainable_state(model)),
                          "config": ConfigRecord({"server-round": 1})})
    msg = Message(content, dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=cfg.to_flat())
    return client_app.train(msg, context)


def _journal(out, name):
    return journal.read(out / "ledgers" / "run-1" / name / "journal.jsonl")


SIMULATED = {"partition-id": 0, "num-partitions": 1}


@pytest.mark.slow
def test_the_ledger_fingerprint_is_the_same_with_scrubbing_on_and_off(tiny_bert, data_file,
                                                                      tmp_path):
    seen = {}
    for floor in ("", "all", "email"):
        out = tmp_path / f"out-{floor or 'off'}"
        reply = _train(_cfg(tiny_bert, data_file, out, **{"deidentify-floor": floor}), SIMULATED)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        event = _journal(out, "institution-0")[-1]
        folder = out / "ledgers" / "run-1" / "institution-0"
        ledger = sorted(p.name for p in folder.glob("*.json"))
        caches = {p.name for p in (out / "token-cache").glob("*.pt")}
        counts = event["deidentified"]["files"][str(data_file)]["counts"]
        seen[floor] = (event["dataset"], ledger, caches, counts)
    (off, ledger_off, cache_off, counts_off), (on, ledger_on, cache_on, counts_on) = \
        seen[""], seen["all"]
    assert counts_off == {} and set(counts_on) == set(KINDS)  # scrubbing did change the text
    assert off == on and ledger_off == ledger_on  # ...and the budget still follows the data
    # Tokens and features are keyed on the scrubbed text: on, or other kinds, miss the cache.
    assert cache_on.isdisjoint(cache_off) and seen["email"][2].isdisjoint(cache_on | cache_off)
    assert seen["email"][0] == off


@pytest.fixture
def agreed(monkeypatch):
    """The run is one the institution approved (agreements are tested in test_agreement)."""
    monkeypatch.setattr(handlers, "check_run", lambda *args: None)


@pytest.mark.usefixtures("agreed")
def test_a_deployed_institution_scrubs_even_when_the_run_asks_for_nothing(
        tiny_bert, data_file, tmp_path, values, logs):
    out = tmp_path / "ledger"  # the institution's folder: ledger, journal, caches
    cfg = _cfg(tiny_bert, data_file, tmp_path / "out", **{"deidentify-floor": ""})
    reply = _train(cfg, {"institution": "h1", "data": str(data_file),
                         "ledger-dir": str(out)})  # no [deidentify]: on, every kind
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenised = []
    for path in (out / "token-cache").glob("*.pt"):
        tensors = torch.load(path, weights_only=True)
        if tensors[0].dtype == torch.long:  # token ids (feature files hold floats)
            tokenised += [_norm(tokenizer.decode(row, skip_special_tokens=True))
                          for row in tensors[0]]
    assert len(tokenised) == len(planted_notes(per_kind=6, seed=11))
    assert any("email" in t for t in tokenised)  # the placeholders reached the tokenizer
    cached = [_norm(p.read_text()) for p in (out / "token-cache").glob("deid-*.json")]
    journal_text = _norm((out / "journal.jsonl").read_text())
    reply_text = _norm(str(reply.content))
    log_text = _norm(logs.text)
    for value in values:
        assert not any(value in t for t in tokenised + cached), value
        assert value not in journal_text and value not in reply_text and value not in log_text


@pytest.mark.usefixtures("agreed")
def test_an_institution_below_the_floor_declines_before_reading_data(tiny_bert, data_file,
                                                                    tmp_path, values):
    out = tmp_path / "ledger"
    cfg = _cfg(tiny_bert, data_file, tmp_path / "out", **{"deidentify-floor": "email,phone,date"})
    node = {"institution": "h1", "data": str(data_file), "ledger-dir": str(out),
            "deidentify": DeidSettings(kinds=("email", "url")).to_node()}
    reply = _train(cfg, node)
    assert reply.has_error() and reply.error.code == DECLINED_CODE
    assert "deidentify-floor" in reply.error.reason
    assert "phone, date" in reply.error.reason and "email" not in reply.error.reason.split(
        "requires scrubbing")[1].split("which")[0]
    assert not (out / "token-cache").exists()
    assert not any(v in _norm(reply.error.reason) for v in values)


def test_check_reports_counts_per_kind_and_file_and_journals_them(data_file, tmp_path, logs,
                                                                  values, capsys):
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "client.toml").write_text(
        f'institution = "h1"\nsuperlink = "127.0.0.1:9092"\ninsecure = true\n'
        f'data = "{data_file}"\n\n[deidentify]\nkinds = ["email", "phone", "url", "ip", '
        '"date", "card", "ssn", "id"]\npatterns = [{name = "ward", regex = "Ward \\\\d+"}]\n')
    assert cli.main(["--config", str(kit / "client.toml"), "--check"]) == 0
    report = [r.getMessage() for r in logs.records if "de-identification" in r.getMessage()]
    assert len(report) == 1 and str(data_file) in report[0]
    assert all(f"{kind} 6" in report[0] for kind in KINDS)
    event = journal.read(kit / "ledger" / "journal.jsonl")[-1]
    assert event["event"] == "deidentify-check" and event["patterns"] == ["ward"]
    assert event["files"][str(data_file)]["counts"] == {k: 6 for k in sorted(KINDS)}
    assert cli.main(["--config", str(kit / "client.toml"), "--deid-preview", "3"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("--- ") == 3 and "[" in shown
    for value in values:
        assert value not in _norm(logs.text) and value not in _norm(shown)
        assert value not in _norm((kit / "ledger" / "journal.jsonl").read_text())


def test_a_bad_deidentify_table_names_the_file_and_key(data_file, tmp_path, logs):
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "client.toml").write_text(
        f'institution = "h1"\nsuperlink = "127.0.0.1:9092"\ninsecure = true\n'
        f'data = "{data_file}"\n\n[deidentify]\nkinds = ["emails"]\n')
    assert cli.main(["--config", str(kit / "client.toml"), "--check"]) == 2
    assert re.search(r"client.toml: invalid \[deidentify\] table: kinds", logs.text)


def test_node_config_carries_the_settings_intact():
    from flwr.common.config import parse_config_args

    deid = DeidSettings.model_validate(
        {"kinds": ["email"], "patterns": [{"name": "ward", "regex": "Ward \"?'\\d+ x"}]})
    cmd = runtime_launch.supernode_command({"institution": "h", "superlink": "x:1", "data": "d.csv",
                                 "insecure": True, "deidentify": deid}, 9999)
    node = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert DeidSettings.from_node(node["deidentify"]) == deid
    assert json.loads(DeidSettings().model_dump_json())["kinds"] == list(KINDS)


def test_the_floor_is_an_agreement_term_the_coordinator_cannot_lower():
    from fedsilo.common.agreement import differences, run_terms

    def terms(floor):
        cfg = FedsiloConfig.from_flat({"deidentify-floor": floor})
        return run_terms(cfg, ["a", "b"], model_sha256="m", app_sha256="b", code_sha256="c")

    assert terms("all")["deidentify-floor"] == json.dumps(list(KINDS))
    assert any("deidentify-floor" in d for d in differences(terms("all"), terms("email")))
