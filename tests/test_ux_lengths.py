"""Sequence length from the data: ``--max-length auto`` and the truncated share."""

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
from make_long_texts import make_rows, write_csv
from transformers import AutoTokenizer

from fedsilo.common import lengths
from fedsilo.common.model import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


def test_short_texts_get_a_short_length_that_holds_them_all(tokenizer):
    texts = [text for text, _, _ in make_rows(200, 6, 2, seed=0)]
    measured = lengths.token_lengths(tokenizer, texts)
    choice = lengths.choose_length(measured, lengths.model_limit(tokenizer, 512))
    assert choice.length <= 16 and choice.length == np.quantile(measured, 0.95, method="lower")
    assert choice.truncated <= 0.05
    assert "max length" in choice.describe() and "capped" not in choice.describe()


def test_long_texts_are_capped_and_the_cut_share_is_stated(tokenizer, logs):
    texts = [text for text, _, _ in make_rows(200, 300, 2, seed=0)]
    measured = lengths.token_lengths(tokenizer, texts)
    assert np.median(measured) > 250
    choice = lengths.choose_length(measured, lengths.model_limit(tokenizer, 512))
    assert choice.length == lengths.MEMORY_CAP and choice.needed > lengths.MEMORY_CAP
    assert choice.truncated == lengths.truncated_share(measured, choice.length) > 0.5
    assert "capped at 256" in choice.describe() and "--max-length" in choice.describe()
    with logs.at_level(logging.WARNING, logger="fedsilo"):
        assert lengths.warn_if_truncated(choice.truncated, choice.length, "training texts")
    assert "are cut" in logs.text
    # a model with fewer positions (the tiny test BERT has 128) bounds it too
    assert lengths.choose_length(measured, lengths.model_limit(tokenizer, 128)).length == 128


def test_a_mixed_set_covers_the_stated_share(tokenizer):
    rows = make_rows(400, 60, 2, seed=3, short_share=0.5)
    measured = lengths.token_lengths(tokenizer, [t for t, _, _ in rows])
    choice = lengths.choose_length(measured, 512)
    assert lengths.truncated_share(measured, choice.length) <= 1 - lengths.COVERAGE
    assert lengths.truncated_share(measured, choice.length - 1) > 1 - lengths.COVERAGE


def test_simulation_picks_the_length_and_logs_it(tiny_bert, tmp_path, logs, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "run_simulation_lengths", ROOT / "simulations" / "run_simulation.py")
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    data = write_csv(tmp_path / "long.csv", make_rows(60, 300, 2, seed=2))
    argv = ["--data", str(data), "--partition", "column", "--model", str(tiny_bert)]
    cfg = sim.preflight(sim.resolve_config(sim.build_parser().parse_args(argv)), 2, True)
    assert cfg.model.max_length == 128  # the tiny BERT's position limit
    assert "--max-length auto: max length 128 tokens" in logs.text
    assert "of the texts are truncated" in logs.text
    explicit = sim.build_parser().parse_args([*argv, "--max-length", "64"])
    assert sim.preflight(sim.resolve_config(explicit), 2, False).model.max_length == 64
    with pytest.raises(SystemExit):
        sim.build_parser().parse_args([*argv, "--max-length", "long"])


def test_flower_client_check_shows_the_share_the_agreed_length_cuts(tiny_bert, tmp_path, logs):
    from fedsilo.client.agreements import approve
    from fedsilo.client.keys import keygen
    from fedsilo.client.length_check import length_check
    from fedsilo.client.settings import LEDGER_KEY
    from fedsilo.common.config import FedsiloConfig
    from fedsilo.common.task import freeze_labels
    from fedsilo.server.agreements import write_agreement
    from fedsilo.server.provision import provision

    key = keygen(tmp_path / "site", "site-a")
    pki = provision(tmp_path / "pki", ["localhost"], ["site-a"], public_keys={"site-a": key.public})
    data = write_csv(tmp_path / "mail.csv", make_rows(40, 300, 1, seed=4))
    settings = {LEDGER_KEY: str(tmp_path / "ledger"), "data": str(data), "model": str(tiny_bert)}
    assert length_check(settings) == {}  # nothing approved yet: nothing to measure against
    cfg = freeze_labels(FedsiloConfig.from_flat({
        "model": str(tiny_bert), "max-length": 24, "labels": '["billing", "clinical", '
        '"staffing"]', "output-dir": str(tmp_path / "out")}))
    files = {"ca": pki.ca_cert, "cert": pki.server_cert, "key": pki.server_key}
    ident = write_agreement(cfg, "mail", files, tmp_path / "agreement.json")
    from fedsilo.client.length_check import before_approval

    (tmp_path / "client.toml").write_text(f'data = "mail.csv"\nmodel = "{tiny_bert}"\n')
    with logs.at_level(logging.INFO, logger="fedsilo"):  # shown before the operator says yes
        assert before_approval(tmp_path / "client.toml", tmp_path / "agreement.json") == 1.0
    assert "agreement agreement.json: max length 24 tokens truncates 100.0%" in logs.text
    approve(tmp_path / "agreement.json", tmp_path / "ledger", pki.ca_cert, lambda _: True)
    with logs.at_level(logging.INFO, logger="fedsilo"):
        assert length_check(settings) == {ident: 1.0}  # every e-mail is longer than 24 tokens
    assert f"agreement {ident} (federation 'mail'): max length 24 tokens truncates 100.0%" \
        in logs.text
    assert "are cut" in logs.text  # and a warning says what that means
