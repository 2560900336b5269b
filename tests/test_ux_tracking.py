"""Experiment tracking at the coordinator, read back with the trackers' own readers."""

import json

from ux_support import need, run_doc

from fedsilo.server.tracking import TENSORBOARD_DIR, Tracker, mlflow_uri


def _scalars(folder):
    accumulators = need("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulators.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 4)) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_carry_every_rounds_metrics(tmp_path):
    doc = run_doc()
    tracker = Tracker(tmp_path, doc["config"])
    tracker.update({"rounds": doc["rounds"][:2]})  # as rounds finish ...
    doc["rounds"][1]["federated_eval"] = {"accuracy": 0.4, "loss": 1.0, "macro_f1": 0.3}
    tracker.update(doc)  # ... and a figure filled in a round later (fused evaluation)
    tracker.update(doc)  # nothing twice
    tracker.close(completed=True)
    scalars = _scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["eval/accuracy"] == [(0, 0.1), (1, 0.3), (2, 0.6)]
    assert [s for s, _ in scalars["epsilon/hospital-a"]] == [1, 2]
    assert scalars["epsilon/hospital-b"][-1] == (2, 9.0)
    assert scalars["federated_eval/accuracy"] == [(1, 0.4)]
    assert scalars["system/round_seconds"][1] == (1, 300.0)
    assert scalars["system/dropped"][-1] == (2, 1.0)
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.0)]


def test_mlflow_local_store_holds_the_run_params_and_metrics(tmp_path):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    doc = run_doc()
    tracker = Tracker(tmp_path, doc["config"], mlflow="local")
    tracker.update(doc)
    tracker.close(completed=True)
    client = MlflowClient(tracking_uri=mlflow_uri("local", tmp_path))
    experiment = client.get_experiment_by_name("fedsilo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["target-epsilon"] == "8.0"
    assert run.data.tags["agreement-id"] == "agr-1234"
    history = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 0.1), (1, 0.3), (2, 0.6)]
    assert client.get_metric_history(run.info.run_id, "epsilon/hospital-a")[-1].value == 6.0
    assert (tmp_path / "mlruns").is_dir()  # a folder in the output folder, no server
    json.dumps(run.data.metrics)  # plain numbers
