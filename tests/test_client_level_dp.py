"""Client-level DP: Flower's wrappers and accountant, a different guarantee."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from support import strategy_for

from fedsilo.client.policy import PolicyError, institution_config
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.wire import UNIFORM_WEIGHT_KEY
from fedsilo.server import checkpoint
from fedsilo.server.client_dp import calibrate_noise, new_accountant

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "simulations" / "run_simulation.py"


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a task


def _spent(cfg: FedsiloConfig, sigma: float) -> float:
    accountant = new_accountant(cfg)
    event = GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=cfg.federation.min_train,
                                 population_size=cfg.federation.min_available)
    accountant.compose(event, count=cfg.federation.num_rounds)
    return accountant.get_privacy_spent().epsilon


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_noise_is_the_smallest_that_flowers_accountant_keeps_within_target(epsilon):
    cfg = FedsiloConfig.from_flat({"dp-level": "client", "target-epsilon": epsilon,
                                   "num-rounds": 5, "min-train": 10, "min-available": 10})
    sigma = calibrate_noise(cfg)
    assert _spent(cfg, sigma) <= epsilon
    assert _spent(cfg, sigma * 0.98) > epsilon  # tight: a little less noise overshoots


def test_the_institution_clips_its_whole_update(tiny_bert, tmp_path, train_round):
    cfg = FedsiloConfig.from_flat({
        "output-dir": str(tmp_path), "model": str(tiny_bert), "trainable": "top-k",
        "top-k": 1, "max-examples": 60, "batch-size": 20, "holdout-fraction": 0.0,
        "partition": "iid", "max-length": 16, "dp-level": "client", "learning-rate": 0.05})
    received, reply = train_round(cfg, **{KEY_CLIPPING_NORM: 0.01})
    sent = reply.content["arrays"].to_torch_state_dict()
    norm = math.sqrt(sum(float(((sent[k].numpy() - v) ** 2).sum()) for k, v in received.items()))
    assert norm == pytest.approx(0.01, rel=1e-3)  # lr 0.05 moves far more; clipped to C
    metrics = reply.content["metrics"]
    assert metrics[UNIFORM_WEIGHT_KEY] == 1.0 and math.isinf(metrics["epsilon"])


def test_an_institution_declines_client_level_dp_unless_it_allows_no_record_dp():
    run = FedsiloConfig.from_flat({"dp-level": "client"})
    node = {"institution": "hospital-a", "data": "notes.csv"}
    with pytest.raises(PolicyError, match="client-level DP"):
        institution_config(run, node)
    cfg, _ = institution_config(run, {**node, "allow-no-dp": True})
    assert cfg.privacy.dp_level == "client"


@pytest.mark.slow
def test_client_level_federation_reports_flowers_epsilon(tiny_bert, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--institutions", "2", "--num-rounds", "2",
         "--model", str(tiny_bert), "--max-examples", "200", "--batch-size", "32",
         "--max-length", "16", "--dp-level", "client", "--update-clipping", "coordinator",
         "--update-clipping-norm", "0.5", "--target-epsilon", "4", "--output-dir", str(out)],
        cwd=tmp_path, text=True, capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "client-level ε" in done.stdout
    doc = json.loads((out / "metrics.json").read_text())
    cfg = FedsiloConfig.from_flat(doc["config"])
    spent = [doc["rounds"][r]["client_level_dp"] for r in (1, 2)]
    assert [s["releases"] for s in spent] == [1, 2]
    assert spent[0]["epsilon"] < spent[1]["epsilon"] <= 4.0
    assert spent[1]["clipping_norm"] == 0.5
    # ε is Flower's accountant's, recomputed here from σ and the number of releases.
    assert spent[1]["epsilon"] == pytest.approx(_spent(cfg, spent[1]["noise_multiplier"]))
    for r in (1, 2):
        assert set(doc["rounds"][r]["institutions"]) == {"institution-0", "institution-1"}
    assert np.isfinite(doc["rounds"][2]["centralized_eval"]["loss"])


def test_a_resumed_client_level_run_goes_on_counting_the_releases_before_it(tmp_path):
    # The accountant was not checkpointed: after --resume its ε restarted from 0, and
    # Flower's max-epsilon guard with it, so a resumed run could spend its budget again.
    cfg = FedsiloConfig.from_flat({"dp-level": "client", "target-epsilon": 4,
                                   "num-rounds": 6, "min-available": 2, "min-train": 2,
                                   "output-dir": str(tmp_path)})

    def strategy():
        return strategy_for(cfg, tmp_path)

    first = strategy()
    event = GaussianPrivacyEvent(noise_multiplier=first.noise_multiplier, sample_size=2,
                                 population_size=2)
    first.accountant.compose(event, count=3)  # three rounds released
    checkpoint.save(tmp_path, checkpoint.Checkpoint(3, 7, {"w": np.zeros(2)},
                                                    first.checkpoint_state(), {}, {}))
    resumed = strategy()
    resumed.restore_checkpoint_state(checkpoint.load(tmp_path).strategy_state)
    assert resumed.privacy_spent().num_releases == 3
    assert resumed.privacy_spent().epsilon == pytest.approx(first.privacy_spent().epsilon)
    assert resumed.privacy_spent().epsilon > 0
    with pytest.raises(checkpoint.CheckpointError, match="accountant's releases"):
        strategy().restore_checkpoint_state({})  # a checkpoint written without them
