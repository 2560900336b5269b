"""End-of-run CSV and plots from metrics.json."""

import csv

from fedsilo.server.plots import write_artefacts


def _doc(client_level=False):
    def inst(eps):
        return {"num_examples": 100, "train_loss": 1.0, "epsilon": eps, "delta": 1e-5}

    rounds = [{"round": 0, "train_loss": None, "institutions": {}, "client_level_dp": None,
               "centralized_eval": {"loss": 3.0, "accuracy": 0.1, "macro_f1": 0.05},
               "federated_eval": None, "seconds": 1.0}]
    for r in (1, 2):
        rounds.append({
            "round": r, "train_loss": 2.0 / r, "seconds": 10.0,
            "institutions": {"hospital-a": inst(3.0 * r), "hospital-b": inst(None)},
            "client_level_dp": {"epsilon": 1.0 * r} if client_level else None,
            "centralized_eval": {"loss": 2.0 / r, "accuracy": 0.3 * r, "macro_f1": 0.2 * r},
            "federated_eval": {"loss": 2.1 / r, "accuracy": 0.25 * r, "macro_f1": 0.2 * r}})
    return {"config": {"target-epsilon": 8.0, "dp": True}, "holdout_majority_rate": 0.28,
            "rounds": rounds}


def test_csv_has_a_row_per_round_and_institution_and_the_plots_are_pngs(tmp_path):
    paths = write_artefacts(_doc(), tmp_path)
    with paths[0].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 + 2 * 2  # a federation row per round, an institution row per update
    a2 = next(r for r in rows if r["round"] == "2" and r["institution"] == "hospital-a")
    assert float(a2["epsilon"]) == 6.0
    fed2 = next(r for r in rows if r["round"] == "2" and r["institution"] == "(federation)")
    assert float(fed2["eval_accuracy"]) == 0.6
    for png in paths[1:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_client_level_runs_plot_the_coordinators_epsilon(tmp_path):
    paths = write_artefacts(_doc(client_level=True), tmp_path)
    with paths[0].open() as f:
        rows = list(csv.DictReader(f))
    fed = [r for r in rows if r["institution"] == "(federation)" and r["round"] != "0"]
    assert [float(r["epsilon"]) for r in fed] == [1.0, 2.0]
