"""Canary membership-inference audit: an empirical lower bound on ε from one training run.

The audit follows Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1)
Training Run" (arXiv:2305.08846). ``m`` canaries are generated; each is inserted into
the training data independently with probability 1/2. After training, every canary is
scored by the final model; the auditor guesses "member" for the ``k`` highest scores and
"non-member" for the ``k`` lowest, abstaining on the rest. If training is (ε, δ)-DP with
respect to each canary, the number of correct guesses is (up to a δ term) stochastically
dominated by ``Binomial(r, e^ε / (1 + e^ε))`` with ``r = 2k`` guesses, so a count that is
implausible at confidence ``1 - β`` for some ε proves the training is not ε-DP: the
largest such ε is the audit's lower bound.

Nothing here computes the *claimed* ε: that comes from the training's own accountant.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import special, stats
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedsilo.common.model import forward_logits

logger = logging.getLogger(__name__)

#: Share of the canaries guessed on (``r = 2k``) for each ``k`` of the default grid.
DEFAULT_GUESS_SHARES = (0.1, 0.2, 0.4, 0.6, 1.0)


@dataclass(frozen=True)
class Canaries:
    """Generated canaries: texts, label names and the random membership coin of each."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    members: tuple[bool, ...]
    seed: int

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def member_texts(self) -> list[str]:
        """Return the texts of the canaries chosen for insertion."""
        return [t for t, keep in zip(self.texts, self.members, strict=True) if keep]


def canary_vocabulary(tokens: Iterable[str], min_chars: int = 4) -> list[str]:
    """Return whole, lower-case alphabetic words of a tokenizer vocabulary.

    Such words tokenize to one token each, so a canary of ``w`` words is ``w`` tokens
    long; sub-word pieces (``##ing``) and special tokens (``[CLS]``) are dropped.
    """
    return sorted({t for t in tokens
                   if len(t) >= min_chars and t.isascii() and t.isalpha() and t.islower()})


def generate_canaries(
    m: int,
    labels: Sequence[str],
    vocabulary: Sequence[str],
    seed: int,
    words: int = 8,
    avoid: Iterable[str] = (),
) -> Canaries:
    """Generate ``m`` canaries deterministically from ``seed``.

    Each canary is ``words`` distinct random words from ``vocabulary`` (a text with no
    real signal) and a label drawn uniformly from ``labels``. Membership is an
    independent fair coin per canary, as the one-run audit's analysis assumes (so the
    number inserted is Binomial(m, 1/2), not exactly ``m / 2``).

    Raises
    ------
    ValueError
        If ``m < 2``, ``labels`` is empty or the vocabulary is too small.

    """
    if m < 2:
        raise ValueError(f"need at least 2 canaries, got {m}")
    if not labels:
        raise ValueError("need at least one label to draw canary labels from")
    vocab = sorted(set(vocabulary))
    if len(vocab) < max(words, 2) * 4:
        raise ValueError(f"vocabulary of {len(vocab)} words is too small for canaries of "
                         f"{words} words")
    rng = np.random.default_rng(seed)
    taken = set(avoid)
    texts: list[str] = []
    while len(texts) < m:
        text = " ".join(vocab[i] for i in rng.choice(len(vocab), words, replace=False))
        if text not in taken:
            taken.add(text)
            texts.append(text)
    drawn = rng.integers(0, len(labels), m)
    coins = rng.random(m) < 0.5
    return Canaries(tuple(texts), tuple(labels[i] for i in drawn),
                    tuple(bool(c) for c in coins), seed)


def balanced_sample(labels: Sequence[str], n: int, seed: int) -> list[int]:
    """Return ``n`` random indices, class-balanced: dealt round-robin over the labels."""
    order = np.random.default_rng(seed).permutation(len(labels))
    rank, seen = np.empty(len(labels)), Counter[str]()
    for i in order:
        rank[i] = seen[labels[i]]
        seen[labels[i]] += 1
    return [int(i) for i in sorted(order, key=lambda i: rank[i])[:n]]  # stable sort


@torch.no_grad()
def score_canaries(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    label_ids: Sequence[int],
    max_length: int,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
) -> np.ndarray:
    """Return each canary's log-probability of its canary label under ``model``.

    Members should score higher than non-members if the model memorised them.
    """
    model.eval().to(device)
    scores = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding="longest",
                        truncation=True, max_length=max_length, return_tensors="pt")
        logits = forward_logits(model, enc["input_ids"].to(device),
                                enc["attention_mask"].to(device))
        y = torch.as_tensor(label_ids[start:start + batch_size], device=device)
        logp = torch.log_softmax(logits.float(), -1).gather(1, y[:, None])[:, 0]
        scores.append(logp.cpu().numpy())
    return np.concatenate(scores).astype(np.float64)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Return P[at least ``v`` of ``r`` guesses correct] bounded for an (ε, δ)-DP mechanism.

    This is the bound of Steinke et al. (2023) for ``m`` canaries included independently
    with probability 1/2: ``P[Binomial(r, q) >= v] + 2 m δ α`` with
    ``q = e^ε / (1 + e^ε)`` and ``α = max_{1<=i<=v} P[v - i <= Binomial(r, q) < v] / i``.
    With ``delta = 0`` it is the pure ε-DP bound.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    alpha = float(np.max((stats.binom.sf(v - i - 1, r, q) - tail) / i))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, beta: float, delta: float = 0.0) -> float:
    """Return the largest ε that ``v`` correct of ``r`` guesses rejects at level ``beta``.

    That is the supremum of ε with ``p_value(m, r, v, ε, δ) < beta`` (0 if even ε = 0
    is not rejected), found by bisection to within 1e-4.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, 2 * high
        if high > 1e3:  # only reached for r so large that the bound is meaningless
            return low
    while high - low > 1e-4:
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < beta else (low, mid)
    return low


@dataclass(frozen=True)
class Guess:
    """One guessing rule of the audit: ``k`` top and ``k`` bottom canaries."""

    k: int
    guesses: int
    correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class AuditResult:
    """The audit's outcome; ``epsilon_lower_bound`` is the best ``k``'s, Bonferroni-corrected.

    Every rule of ``grid`` is tested at level ``beta / len(grid)``, so the maximum over
    the grid holds at confidence ``1 - beta`` overall.
    """

    m: int
    members: int
    beta: float
    delta: float
    k: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    grid: tuple[Guess, ...]

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready view."""
        return asdict(self)


def default_k_grid(m: int, shares: Sequence[float] = DEFAULT_GUESS_SHARES) -> list[int]:
    """Return the ``k`` values whose ``2k`` guesses cover the given shares of ``m``."""
    return sorted({max(1, min(m // 2, round(s * m / 2))) for s in shares})


def audit(
    scores: Sequence[float],
    members: Sequence[bool],
    beta: float = 0.05,
    delta: float = 0.0,
    k_grid: Sequence[int] | None = None,
) -> AuditResult:
    """Run the one-run membership audit on canary scores (higher = more likely member).

    Parameters
    ----------
    scores
        One score per canary, e.g. from :func:`score_canaries`.
    members
        Whether each canary was actually trained on.
    beta
        1 - confidence of the lower bound, shared over the grid (Bonferroni).
    delta
        δ of the (ε, δ) claim under test; 0 tests pure ε-DP.
    k_grid
        Guessing rules to try; default :func:`default_k_grid`.

    """
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(members, dtype=bool)
    m = len(s)
    if m != len(truth) or m < 2:
        raise ValueError(f"need >= 2 scores and one membership per score, got {m} and "
                         f"{len(truth)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    ks = sorted(set(k_grid)) if k_grid is not None else default_k_grid(m)
    if not ks or min(ks) < 1 or max(ks) > m // 2:
        raise ValueError(f"every k must be in [1, {m // 2}], got {ks}")
    order = np.argsort(-s, kind="stable")  # ties keep canary order, which is independent
    level = beta / len(ks)                  # of membership
    rules = []
    for k in ks:
        correct = int(truth[order[:k]].sum() + (~truth[order[m - k:]]).sum())
        rules.append(Guess(k, 2 * k, correct, epsilon_lower_bound(m, 2 * k, correct, level,
                                                                  delta)))
    best = max(rules, key=lambda g: (g.epsilon_lower_bound, g.correct / g.guesses))
    result = AuditResult(m, int(truth.sum()), beta, delta, best.k, best.guesses, best.correct,
                         best.epsilon_lower_bound, tuple(rules))
    logger.info("audit: %d/%d correct guesses (k=%d of %d canaries) -> ε >= %.3f at %.0f%% "
                "confidence", best.correct, best.guesses, best.k, m, best.epsilon_lower_bound,
                100 * (1 - beta))
    return result


def auc(scores: Sequence[float], members: Sequence[bool]) -> float:
    """Return the ROC AUC of ``scores`` for membership (0.5 = no signal), ties counted half."""
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(members, dtype=bool)
    pos, neg = s[truth], s[~truth]
    if not len(pos) or not len(neg):
        return math.nan
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2)
                 / (len(pos) * len(neg)))
