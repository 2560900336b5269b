#!/usr/bin/env python3
"""De-identification: what it costs in accuracy on the demo, and how fast it scrubs.

Accuracy: the README demo (3 institutions, Dirichlet α = 0.5, ε = 8, the demo's
rounds, epochs and strategy) run twice per seed, as it is and with ``--deidentify``
(every institution scrubs every pattern kind before tokenising), on the same
coordinator holdout. ICD-10-CM descriptions carry almost no identifiers, so the two
should agree up to DP noise; the scrub counts per kind show what was replaced.

Throughput: texts per second of one scrubber (all pattern kinds, one process) over
every built-in ICD-10-CM description and over synthetic notes dense with planted
identifiers (tests/make_identifiers.py), and the time to read the scrubbed texts back
from the institution's on-disk cache (what every later message of a run pays).

    .venv/bin/python bench/deidentify.py          # writes bench/results/deidentify.{json,md}
    .venv/bin/python bench/deidentify.py --skip-accuracy   # throughput only (~2 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS, SIMULATION, markdown, write

from fedsilo.common.deidentify import DeidSettings, Report, Scrubber
from fedsilo.common.records import TextRecords, load_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from make_identifiers import planted_notes  # noqa: E402


def throughput(records: TextRecords, name: str) -> dict[str, Any]:
    """Scrub ``records`` cold (no cache) and again from the cache; rates in texts/s."""
    scrubber = Scrubber(DeidSettings())
    scrubber.scrub("warm-up 212-555-0143 on 2021-03-04")  # compiles every pattern
    with tempfile.TemporaryDirectory() as cache:
        report = Report()
        started = time.perf_counter()
        scrubber.scrub_records(records, Path(cache), report)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        scrubber.scrub_records(records, Path(cache), Report())
        cached = time.perf_counter() - started
    doc = report.as_dict()[records.source]
    logging.info("%s: %d texts in %.1f s (%.0f texts/s), %d changed, %s; cached read %.2f s",
                 name, len(records), cold, len(records) / cold, doc["changed"], doc["counts"],
                 cached)
    return {"texts": len(records), "seconds": cold, "texts_per_second": len(records) / cold,
            "changed": doc["changed"], "counts": doc["counts"],
            "cached_seconds": cached, "cached_texts_per_second": len(records) / cached}


def demo_run(name: str, flags: list[str], out: Path) -> dict[str, Any]:
    """One demo simulation; its held-out accuracy and each institution's scrub counts."""
    started = time.monotonic()
    run_dir = out / name
    cmd = [sys.executable, str(SIMULATION), *flags, "--output-dir", str(run_dir)]
    logging.info("%s: %s", name, " ".join(cmd[2:]))
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    last = json.loads((run_dir / "metrics.json").read_text("utf-8"))["rounds"][-1]
    counts: dict[str, int] = {}
    for path in (run_dir / "ledgers").rglob("journal.jsonl"):
        event = json.loads(path.read_text("utf-8").splitlines()[-1])
        for file in event["deidentified"]["files"].values():
            for kind, n in file["counts"].items():
                counts[kind] = counts.get(kind, 0) + n
    eps = [s["epsilon"] for s in last["institutions"].values()]
    result = {"setting": name, "flags": flags, "accuracy": last["centralized_eval"]["accuracy"],
              "macro_f1": last["centralized_eval"]["macro_f1"], "max_epsilon": max(eps),
              "scrubbed": counts, "seconds": time.monotonic() - started}
    logging.info("%s: accuracy %.4f, ε %.2f, scrubbed %s, %.1f min", name, result["accuracy"],
                 result["max_epsilon"], counts, result["seconds"] / 60)
    return result


def main() -> None:
    """Measure throughput, then the demo with and without scrubbing; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "deidentify-runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    notes = planted_notes(per_kind=200, seed=29)
    speed = {"icd10": throughput(load_records("icd10"), "icd10"),
             "planted-notes": throughput(TextRecords([n.text for n in notes],
                                                     ["a"] * len(notes), {}, "planted"),
                                         "planted notes")}
    runs = []
    if not args.skip_accuracy:
        for seed in args.seeds:
            for name, flags in (("demo-eps-8", []), ("demo-eps-8-deidentified",
                                                     ["--deidentify"])):
                run = demo_run(f"{name}-seed-{seed}", ["--seed", str(seed), *flags],
                               args.out.resolve())
                runs.append({**run, "seed": seed})
    rows = [[r["setting"], f"{r['max_epsilon']:.2f}", f"{r['accuracy']:.4f}",
             f"{r['macro_f1']:.4f}", json.dumps(r["scrubbed"]) or "{}",
             f"{r['seconds'] / 60:.1f}"] for r in runs]
    table = markdown(["run", "ε spent (max)", "accuracy", "macro-F1", "scrubbed (all "
                      "institutions, per kind)", "minutes"], rows) if rows else ""
    table += "\n\n" + markdown(
        ["texts", "count", "texts/s (scrub)", "changed", "texts/s (cached read)"],
        [[name, s["texts"], f"{s['texts_per_second']:.0f}", s["changed"],
          f"{s['cached_texts_per_second']:.0f}"] for name, s in speed.items()])
    path = write("deidentify", {"throughput": speed, "accuracy": runs}, table.strip())
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
