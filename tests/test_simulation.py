"""End to end: the simulation script, as a user runs it, with real Flower processes."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import pipeline

from fedsilo.common.records import load_records

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "simulations" / "run_simulation.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, text=True,
                          capture_output=True, timeout=900, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def hospital_csv(tmp_path_factory) -> Path:
    """ICD-10 descriptions from two 'hospitals', naturally split by a column."""
    icd = load_records("icd10")
    path = tmp_path_factory.mktemp("data") / "diagnoses.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["description", "chapter", "institution"])
        for i in range(0, len(icd), 45):  # ~800 rows spread over all chapters
            writer.writerow([icd.texts[i], icd.labels[i], f"hospital-{'ab'[i % 2]}"])
    return path


@pytest.mark.slow
def test_two_institution_dp_federation_end_to_end(tiny_st_bert, hospital_csv, tmp_path):
    out = tmp_path / "run"
    # A mean-pooling sentence-transformers folder, like the default MiniLM.
    # no --institutions: the 2-valued institution column sets the count
    done = _run("--num-rounds", "2", "--model", str(tiny_st_bert),
                "--data", str(hospital_csv), "--text-column", "description",
                "--label-column", "chapter", "--partition", "column",
                "--learning-rate", "0.01", "--batch-size", "32", "--target-epsilon", "6",
                "--holdout-fraction", "0.2", "--output-dir", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--partition column: 2 institutions" in done.stderr + done.stdout
    assert "--max-length auto: max length" in done.stderr + done.stdout
    assert "of the texts are truncated" in done.stderr + done.stdout
    for r in (0, 1, 2):
        assert f"round {r}/2" in done.stdout  # one progress line per round

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["config"]["dp"] is True
    for artefact in ("rounds.csv", "accuracy_loss.png", "epsilon.png", "report.html"):
        assert (out / artefact).stat().st_size > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # always written
    page = (out / "report.html").read_text()
    assert "hospital-a" in page and "confusion matrix" in page and "held-out texts" in page
    events = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "sent"] == [1, 2]
    assert {e["institution"] for e in events if e["event"] == "received"} == {
        "hospital-a", "hospital-b"}
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["centralized_eval"]["loss"] < rounds[0]["centralized_eval"]["loss"]
    assert rounds[2]["train_loss"] < rounds[1]["train_loss"]
    for r in rounds[1:]:
        assert set(r["institutions"]) == {"hospital-a", "hospital-b"}
        assert r["bytes_received"] == sum(i["bytes_received"] for i in r["institutions"].values())
        for inst in r["institutions"].values():
            assert 0 < inst["epsilon"] <= 6.0 and 0 < inst["delta"] < 1 / inst["num_examples"]
    eps = [rounds[k]["institutions"]["hospital-a"]["epsilon"] for k in (1, 2)]
    assert eps[0] < eps[1]  # cumulative, not per round

    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model_type"] == "fedsilo_mean_bert"
    classify = pipeline("text-classification", model=str(out / "model"), device="cpu",
                        trust_remote_code=True)
    prediction = classify("Fracture of left femur")[0]
    assert prediction["label"] in metrics["labels"]
    assert (out / "run.log").stat().st_size > 0


@pytest.mark.slow
def test_scaffold_sends_each_institution_its_correction_from_round_two(
        tiny_st_bert, hospital_csv, tmp_path):
    out = tmp_path / "run"
    # no --institutions: the 2-valued institution column sets the count
    done = _run("--num-rounds", "2", "--model", str(tiny_st_bert),
                "--data", str(hospital_csv), "--text-column", "description",
                "--label-column", "chapter", "--partition", "column", "--strategy",
                "scaffold", "--optimizer", "sgd", "--learning-rate", "1", "--batch-size", "32",
                "--output-dir", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    sent = {e["institution"]: e["correction"]["sha256"] for e in sent
            if e["event"] == "correction"}
    assert set(sent) == {"hospital-a", "hospital-b"}  # round 2 only, by name
    assert sent["hospital-a"] != sent["hospital-b"]  # c − c_i differs per institution
    for name, digest in sent.items():
        journal = next((out / "ledgers").glob(f"run-*/{name}/journal.jsonl"))
        trained = [json.loads(line) for line in journal.read_text().splitlines()]
        trained = [e for e in trained if e["event"] == "train"]
        assert [e["round"] for e in trained] == [1, 2]
        assert trained[0]["correction"] is None and trained[1]["correction"]["sha256"] == digest
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["rounds"][2]["failures"] == []


def test_bad_flag_value_exits_2_naming_the_flag(tmp_path):
    done = _run("--target-epsilon", "-3", cwd=tmp_path)
    assert done.returncode == 2
    assert "--target-epsilon" in done.stderr


def test_label_outside_the_federation_map_fails_before_any_process(hospital_csv, tmp_path):
    done = _run("--data", str(hospital_csv), "--text-column", "description",
                "--label-column", "chapter", "--labels", '["Neoplasms (C00-D49)"]',
                "--partition", "column", "--institutions", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert "diagnoses.csv" in done.stderr and "Injury" in done.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_long_texts_split_by_a_two_valued_column_need_no_institutions_flag(
        tiny_st_bert, tmp_path):
    from make_long_texts import make_rows, write_csv

    data = write_csv(tmp_path / "mail.csv", make_rows(160, 300, 2, seed=5))
    out = tmp_path / "run"
    done = _run("--data", str(data), "--partition", "column", "--num-rounds", "1",
                "--model", str(tiny_st_bert), "--batch-size", "16", "--holdout-fraction",
                "0.2", "--output-dir", str(out), cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "--partition column: 2 institutions, one per value of column 'institution'" in log
    assert "--max-length auto: max length 128 tokens" in log  # the tiny BERT's positions
    assert "100.0% of the texts are truncated" in log and "are cut" in log  # and warned
    classify = pipeline("text-classification", model=str(out / "model"), device="cpu",
                        trust_remote_code=True)
    assert classify(" ".join(["invoice overdue"] * 400))[0]["label"] in (
        "billing", "clinical", "staffing")  # > 512 tokens, no truncation argument
