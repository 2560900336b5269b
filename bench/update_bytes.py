#!/usr/bin/env python3
"""Bytes one institution sends per round: full model vs trainable-only vs LoRA, fp32 vs fp16.

Sizes are Flower ``ArrayRecord`` payloads of exactly what the ClientApp releases
(``client.messages.released_arrays``), for the default MiniLM classifier.

    .venv/bin/python bench/update_bytes.py   # writes bench/results/update_bytes.{json,md}
"""

from __future__ import annotations

import logging

import numpy as np
from benchlib import markdown, write
from flwr.app import Array, ArrayRecord

from fedsilo.client.messages import Request, released_arrays
from fedsilo.common.config import ModelConfig
from fedsilo.common.model import get_trainable_state, load_model
from fedsilo.common.records import LabelMap, icd10_label_names
from fedsilo.common.wire import array_record_bytes

SETS = ("all", "top-k", "lora", "classifier")


def main() -> None:
    """Measure and write the results."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    labels = LabelMap.from_names(icd10_label_names())
    results, rows = [], []
    full_fp32 = None
    for trainable in SETS:
        state = {k: v.numpy() for k, v in get_trainable_state(
            load_model(ModelConfig(trainable=trainable), labels, seed=0)).items()}
        request = Request(state, {})
        for dtype in ("float32", "float16"):
            out = released_arrays(request, state, state, dtype)
            size = array_record_bytes(ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                   for k, v in out.items()}))
            full_fp32 = full_fp32 or size  # the first row is the full model in fp32
            params = sum(v.size for v in out.values())
            results.append({"trainable": trainable, "dtype": dtype, "tensors": len(out),
                            "parameters": params, "bytes": size,
                            "share_of_full_fp32": size / full_fp32})
            rows.append([trainable, dtype, f"{params:,}", f"{size / 2**20:.2f}",
                         f"{100 * size / full_fp32:.2f} %"])
    table = markdown(["trainable", "dtype", "parameters", "MiB per round", "of full fp32"], rows)
    path = write("update_bytes", {"results": results}, table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
