#!/usr/bin/env python3
"""Write a CSV of long synthetic texts (e-mail / report sized) for length tests and demos.

Columns ``text,label,institution``; each text is a few hundred words built from a
per-label vocabulary so a classifier can learn something, the institution column has
``--institutions`` values. Deterministic for a seed::

    python tests/make_long_texts.py out.csv --rows 200 --words 300
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

TOPICS = {
    "billing": "invoice payment refund account charge balance statement overdue receipt",
    "clinical": "patient diagnosis fracture therapy dosage admission discharge symptom scan",
    "staffing": "shift rota nurse vacancy leave overtime schedule handover training",
}
FILLER = ("the of and to in for with on at by from this that we please regards thanks "
          "following attached meeting update note team week report").split()


def make_rows(rows: int, words: int, institutions: int, seed: int,
              short_share: float = 0.0) -> list[tuple[str, str, str]]:
    """``rows`` (text, label, institution) triples; ``short_share`` of them are 5 words."""
    rng = random.Random(seed)
    labels = sorted(TOPICS)
    out = []
    for i in range(rows):
        label = labels[i % len(labels)]
        vocab = TOPICS[label].split()
        count = 5 if rng.random() < short_share else rng.randint(words // 2, words * 3 // 2)
        text = " ".join(rng.choice(vocab) if rng.random() < 0.4 else rng.choice(FILLER)
                        for _ in range(count))
        out.append((text, label, f"site-{'abcdefgh'[i % institutions]}"))
    return out


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Write ``rows`` under a ``text,label,institution`` header; return ``path``."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "institution"])
        writer.writerows(rows)
    return path


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--words", type=int, default=300, help="typical words per text")
    parser.add_argument("--institutions", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_csv(args.out, make_rows(args.rows, args.words, args.institutions, args.seed))


if __name__ == "__main__":
    main()
