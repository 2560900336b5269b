"""The DP step bench runs on the device it is given: model and batch moved, steps timed whole."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedsilo.common.config import ModelConfig
from fedsilo.common.model import load_model
from fedsilo.common.records import LabelMap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
dp_step = importlib.import_module("dp_step")


@pytest.mark.parametrize("mode", ["none", "bk", "ghost", "hooks"])
@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_model_and_batch_land_on_the_requested_device(tiny_bert, mode, trainable):
    # "meta" stands in for CUDA: a device other than the CPU that every host has.
    device = torch.device("meta")
    model = load_model(ModelConfig(model=str(tiny_bert), trainable=trainable),
                       LabelMap.from_names(["a", "b"]), seed=0)
    data = TensorDataset(torch.randint(1000, 5000, (4, 6)), torch.ones(4, 6, dtype=torch.long),
                         torch.randint(0, 2, (4,)))
    private, optimizer, _, batch = dp_step.prepare(model, data, mode, device)
    assert {p.device for p in private.parameters()} == {device}
    assert {t.device for t in batch} == {device}
    trained = {p.device for group in optimizer.param_groups for p in group["params"]}
    assert trained == {device}
    assert all(p.device.type == "cpu" for p in model.parameters())  # the original stays put


def test_timed_steps_wait_for_the_gpu(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    dp_step.synchronize(torch.device("cpu"))
    dp_step.synchronize(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]
