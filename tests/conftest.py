"""Shared fixtures: a tiny randomly initialised BERT that loads in milliseconds."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from fedsilo.common.logs import configure_logging
from fedsilo.common.model import resolve_model_path

configure_logging()


@pytest.fixture
def task_identity() -> None:
    """Flower creates messages inside a task; pretend to be one (``usefixtures``)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with the bundled MiniLM tokenizer, saved as a folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_st_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT as a sentence-transformers folder that asks for mean pooling."""
    folder = tmp_path_factory.mktemp("tiny-st") / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    return folder


@pytest.fixture
def train_round():
    """Run one simulated institution's ClientApp train on a fresh global model.

    Returns ``run(cfg, **config) -> (sent, reply)``: the numpy tensors sent and the
    reply message; ``config`` adds entries to the message's config record.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedsilo.client import client_app
    from fedsilo.common.model import get_trainable_state, load_model
    from fedsilo.common.task import federation_labels

    def run(cfg, **config):
        sent = {k: v.numpy() for k, v in get_trainable_state(
            load_model(cfg.model, federation_labels(cfg), cfg.train.seed)).items()}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                              "config": ConfigRecord({"server-round": 1, **config})})
        msg = Message(content, dst_node_id=7, message_type="train")
        context = Context(run_id=1, node_id=7,
                          node_config={"partition-id": 0, "num-partitions": 2},
                          state=RecordDict(), run_config=cfg.to_flat())
        return sent, client_app.train(msg, context)

    return run


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture fedsilo's log (its logger does not propagate to the root)."""
    logger = logging.getLogger("fedsilo")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
