"""The canary audit: its statistic, its canaries, its data placement and its power."""

import csv
import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import canary_audit as audit  # simulations/ (pytest's pythonpath)
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedsilo.common.config import DataConfig
from fedsilo.common.splits import simulated_institution

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "simulations" / "audit_canaries.py"
VOCAB = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]
LABELS = ["alpha", "beta", "gamma"]


def _script():
    if "audit_canaries" not in sys.modules:  # a script, not a package module
        spec = importlib.util.spec_from_file_location("audit_canaries", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["audit_canaries"] = module
        spec.loader.exec_module(module)
    return sys.modules["audit_canaries"]


# --------------------------------------------------------------- the statistic
def test_perfect_guessing_with_many_canaries_gives_a_large_bound():
    members = np.random.default_rng(0).random(1000) < 0.5
    result = audit.audit(members.astype(float), members)
    assert result.correct == result.guesses >= 600  # the best rule makes no mistake
    assert result.epsilon_lower_bound > 4.5
    # with few canaries even perfect guesses prove little: the bound is capped by m
    few = np.array([True, False] * 10)
    assert 0 < audit.audit(few.astype(float), few).epsilon_lower_bound < 2


def test_random_scores_give_no_bound():
    rng = np.random.default_rng(1)
    bounds = [audit.audit(rng.normal(size=400), rng.random(400) < 0.5).epsilon_lower_bound
              for _ in range(40)]
    assert max(bounds) < 0.5
    assert sum(b > 0 for b in bounds) <= 4  # false detections at most ~β of the time


def test_bound_is_sound_for_a_known_epsilon_dp_mechanism():
    # Randomised response is exactly ε-DP per canary: the member flag is reported
    # truthfully with probability e^ε / (1 + e^ε). The bound must exceed ε at most ~β.
    eps, rng = 1.0, np.random.default_rng(2)
    exceed, bounds = 0, []
    for _ in range(200):
        members = rng.random(300) < 0.5
        truthful = rng.random(300) < math.exp(eps) / (1 + math.exp(eps))
        reported = np.where(truthful, members, ~members)
        bound = audit.audit(reported + rng.random(300) * 1e-3, members).epsilon_lower_bound
        exceed += bound > eps
        bounds.append(bound)
    assert exceed <= 20  # 95% confidence: ~10 expected at worst, usually far fewer
    assert np.median(bounds) > 0.2  # and the audit is not vacuous on it


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta_and_confidence():
    bounds = [audit.epsilon_lower_bound(200, 100, v, 0.05) for v in range(40, 101, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0 and bounds[-1] > 2.5
    assert audit.epsilon_lower_bound(200, 100, 90, 0.05, delta=1e-3) < \
        audit.epsilon_lower_bound(200, 100, 90, 0.05) < \
        audit.epsilon_lower_bound(200, 100, 90, 0.2)


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    q = math.exp(1) / (1 + math.exp(1))
    tail = sum(math.comb(20, i) * q**i * (1 - q)**(20 - i) for i in range(18, 21))
    assert audit.p_value(50, 20, 18, 1.0) == pytest.approx(tail)
    assert audit.p_value(50, 20, 18, 1.0, delta=1e-3) > tail
    with pytest.raises(ValueError, match="guesses"):
        audit.p_value(10, 20, 5, 1.0)


def test_audit_guesses_top_and_bottom_k_and_rejects_bad_input():
    scores = [5, 4, 3, 2, 1, 0]
    members = [True, False, True, False, True, False]
    result = audit.audit(scores, members, k_grid=[1, 3])
    by_k = {g.k: g for g in result.grid}
    assert (by_k[1].guesses, by_k[1].correct) == (2, 2)  # top 1 is in, bottom 1 is out
    assert (by_k[3].guesses, by_k[3].correct) == (6, 4)
    assert result.members == 3 and result.m == 6
    with pytest.raises(ValueError, match="k must be"):
        audit.audit(scores, members, k_grid=[4])
    with pytest.raises(ValueError, match="finite"):
        audit.audit([0, math.nan], [True, False])
    assert audit.auc(scores, members) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- the canaries
def test_canaries_are_deterministic_unique_and_coin_flipped():
    first = audit.generate_canaries(2000, LABELS, VOCAB, seed=7, words=4, avoid=["x"])
    assert first == audit.generate_canaries(2000, LABELS, VOCAB, seed=7, words=4)
    assert first != audit.generate_canaries(2000, LABELS, VOCAB, seed=8, words=4)
    assert len(set(first.texts)) == 2000
    assert all(len(set(t.split())) == 4 and set(t.split()) <= set(VOCAB) for t in first.texts)
    assert set(first.labels) == set(LABELS)
    assert 900 < sum(first.members) < 1100  # Binomial(2000, 1/2): 6 standard deviations
    assert len(first.member_texts) == sum(first.members)
    with pytest.raises(ValueError, match="too small"):
        audit.generate_canaries(10, LABELS, VOCAB[:5], seed=0)


def test_canary_vocabulary_keeps_whole_lowercase_words():
    tokens = ["[CLS]", "##ing", "the", "fracture", "Paris", "über", "x2ray", "femur"]
    assert audit.canary_vocabulary(tokens) == ["femur", "fracture"]


def test_scores_are_log_probabilities_of_the_canary_label(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["femur fracture left", "otitis media", "cough"]
    scores = audit.score_canaries(model, tokenizer, texts, [0, 1, 1], 16, batch_size=2)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model(**enc).logits, -1).numpy()
    assert scores == pytest.approx(logp[[0, 1, 2], [0, 1, 1]], abs=1e-5)


# ------------------------------------------------------------------ the script
def _design(script, tiny_bert, out, flip=None, monkeypatch=None):
    args = script.build_parser().parse_args(
        ["--model", str(tiny_bert), "--real-examples", "600", "--canaries", "60",
         "--test-fraction", "0.05", "--eval-examples", "100"])
    if flip is not None:  # the same canaries with one membership coin flipped
        make = audit.generate_canaries

        def flipped(*a, **kw):
            c = make(*a, **kw)
            coins = list(c.members)
            coins[flip] = not coins[flip]
            return audit.Canaries(c.texts, c.labels, tuple(coins), c.seed)

        monkeypatch.setattr(script.canary_audit, "generate_canaries", flipped)
    out.mkdir()
    split = DataConfig(partition="column", test_fraction=0.05, holdout_fraction=0)
    return script.build_dataset(args, out, split), split.model_copy(
        update={"data": str(out / "audit-data.csv")})


def test_site_0_trains_on_fixed_real_records_plus_exactly_the_members(
        tiny_bert, tmp_path, monkeypatch):
    script = _script()
    design, data = _design(script, tiny_bert, tmp_path / "a")
    canaries = design.canaries
    site0, site1 = (simulated_institution(data, 42, i, 2) for i in (0, 1))
    assert site0.name == "site-0"
    assert sorted(site0.train.texts) == sorted(design.real_train + tuple(canaries.member_texts))
    assert sorted(site0.test.texts) == list(design.real_test) and design.real_test
    assert not set(canaries.texts) & set(site1.train.texts + site1.test.texts)
    with (tmp_path / "a" / "audit-data.csv").open(encoding="utf-8") as f:
        written = {row["text"] for row in csv.DictReader(f)}
    assert not (set(canaries.texts) - set(canaries.member_texts)) & written  # outs stay out
    with (tmp_path / "a" / "eval-data.csv").open(encoding="utf-8") as f:
        evaluation = [row["text"] for row in csv.DictReader(f)]
    assert len(evaluation) == 100 and not set(evaluation) & written
    assert set(canaries.labels) <= set(design.labels)
    saved = json.loads((tmp_path / "a" / "canaries.json").read_text())
    assert saved["members"] == list(canaries.members)

    # flipping one coin adds or removes that canary and changes no other training record
    other, data2 = _design(script, tiny_bert, tmp_path / "b", flip=3, monkeypatch=monkeypatch)
    assert other.canaries.members[3] != canaries.members[3]
    assert other.real_train == design.real_train and other.real_test == design.real_test
    trained = set(simulated_institution(data2, 42, 0, 2).train.texts)
    assert trained ^ set(site0.train.texts) == {canaries.texts[3]}


def test_a_test_fraction_that_canaries_would_shift_is_refused(tiny_bert, tmp_path, caplog):
    logger = logging.getLogger("fedsilo")
    logger.addHandler(caplog.handler)
    try:
        code = _script().main(["--model", str(tiny_bert), "--real-examples", "600",
                               "--canaries", "200", "--test-fraction", "0.3",
                               "--output-dir", str(tmp_path)])
    finally:
        logger.removeHandler(caplog.handler)
    assert code == 2 and "--test-fraction 0.3" in caplog.text


@pytest.mark.parametrize(("flags", "named"), [
    (["--canaries", "1"], "--canaries"),
    (["--partition", "iid"], "--partition"),
    (["--compare", "--target-epsilon", "3"], "--target-epsilon"),
    (["--learning-rate", "-1"], "learning-rate"),
    (["--bogus"], "--bogus"),
])
def test_bad_input_exits_2_naming_the_flag(flags, named, tmp_path, caplog):
    logger = logging.getLogger("fedsilo")  # it does not propagate to pytest's root handler
    logger.addHandler(caplog.handler)
    try:
        assert _script().main([*flags, "--output-dir", str(tmp_path / "out")]) == 2
    finally:
        logger.removeHandler(caplog.handler)
    assert named in caplog.text
    assert not (tmp_path / "out").exists()


def test_markdown_table_has_one_row_per_setting():
    rows = [{"setting": "no DP", "claimed_epsilon": None, "delta": 1e-5,
             "epsilon_lower_bound": 2.5, "correct": 60, "guesses": 60, "auc": 1.0,
             "held_out_accuracy": 0.5, "wall_seconds": 90}]
    table = _script().markdown(rows, 0.05)
    assert "| no DP | — (no DP) | 1e-05 | 2.50 | 60/60 | 1.000 | 0.500 | 1.5 min |" in table


@pytest.mark.slow
def test_no_dp_control_detects_the_canaries(tiny_bert, tmp_path):
    out = tmp_path / "audit"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_bert), "--output-dir", str(out),
         "--real-examples", "600", "--canaries", "100", "--test-fraction", "0.05",
         "--eval-examples", "100", "--no-dp", "--trainable", "all",
         "--num-rounds", "2", "--local-epochs", "15", "--batch-size", "16",
         "--learning-rate", "3e-3", "--encoder-learning-rate", "3e-3"],
        cwd=tmp_path, text=True, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "audit" / "audit.json").read_text())
    canaries = json.loads((out / "canaries.json").read_text())
    assert report["m"] == 100 and report["members"] == sum(canaries["members"])
    assert report["dp"] is False and report["claimed_epsilon"] is None
    assert report["held_out_examples"] == 100  # the disjoint evaluation records
    assert report["epsilon_lower_bound"] >= 1.0  # the audit has power: canaries detected
    assert report["correct"] > 0.9 * report["guesses"]
    assert report["auc"] > 0.9
    members = np.array(report["scores"]["members"])
    assert np.median(members) > np.median(report["scores"]["non_members"])
    assert "ε lower bound" in done.stderr


def test_balanced_sample_deals_round_robin_over_the_labels():
    labels = ["a"] * 50 + ["b"] * 5 + ["c"] * 20
    pick = audit.balanced_sample(labels, 21, seed=3)
    assert pick == audit.balanced_sample(labels, 21, seed=3) and len(set(pick)) == 21
    counts = {y: sum(labels[i] == y for i in pick) for y in "abc"}
    assert counts == {"a": 8, "b": 5, "c": 8}
