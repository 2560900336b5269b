"""The three budget numbers at work: a run's agreed ε, the dataset's lifetime ε, what is left.

:mod:`fedsilo.client.handlers` calls these before any training step: open the dataset's
ledger (refused while it waits for the operator), then admit the run only if the
dataset's remaining lifetime budget pays the run's whole agreed ε and the run stays
within that ε. A decline's reason is generic; what is left is logged here only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedsilo.client import privacy
from fedsilo.client.ledger import Ledger, dataset_fingerprint
from fedsilo.client.policy import Policy
from fedsilo.common.config import FedsiloConfig
from fedsilo.common.records import load_records
from fedsilo.common.splits import InstitutionData

log = logging.getLogger(__name__)


def raw_fingerprint(cfg: FedsiloConfig, partition: tuple[int, int] | None,
                    data: InstitutionData) -> str:
    """Fingerprint of every record the institution holds, before any split.

    A deployed institution's is its whole data file; a virtual institution's, its share.
    """
    if partition is not None:
        return dataset_fingerprint(data.train.texts + data.test.texts,
                                   data.train.labels + data.test.labels)
    raw = load_records(cfg.data.data, cfg.data.text_column, cfg.data.label_column)
    return dataset_fingerprint(raw.texts, raw.labels)


def open_ledger(folder: Path, fingerprint: str, accountant: str, policy: Policy) -> Ledger:
    """The dataset's ledger, refused (declined) while it waits for the operator.

    Raises
    ------
    fedsilo.client.ledger.LedgerRefused
        When the ledger is missing, truncated, rolled back or freshly migrated.
    """
    ledger = Ledger.open(folder, fingerprint, accountant, lifetime=policy.lifetime_epsilon,
                         state_dir=policy.state_dir)
    ledger.require_trusted()
    return ledger


def admit(ledger: Ledger, dp_plan: privacy.DPPlan, run: int, name: str) -> None:
    """Decline unless the run fits the dataset's lifetime ε and its own agreed ε.

    Raises
    ------
    privacy.BudgetExceededError
        Before any step of the round.
    """
    try:
        privacy.check_lifetime(tuple(ledger.history(exclude_run=run)), dp_plan,
                               ledger.accountant, ledger.lifetime)
    except privacy.BudgetExceededError:
        log.warning("%s: declining run %d: it needs ε %g, the dataset has spent ε %.3f of its "
                    "lifetime %g (ε %.3f left; see `flower-client ledger show`)", name, run,
                    dp_plan.target_epsilon, ledger.spent(dp_plan.delta), ledger.lifetime,
                    ledger.left(dp_plan.delta))
        raise
    acc = ledger.restore()
    acc.history = ledger.run_history(run)
    privacy.check_budget(acc, dp_plan)


def report(ledger: Ledger, dp_plan: privacy.DPPlan, run: int, name: str) -> float:
    """Log the three numbers after a recorded round; return the run's ε (what the reply carries)."""
    epsilon = ledger.run_spent(run, dp_plan.delta)
    log.info("%s: run %d has spent ε %.3f of its agreed %g; the dataset has ε %.3f of its "
             "lifetime %g left", name, run, epsilon, dp_plan.target_epsilon,
             ledger.left(dp_plan.delta), ledger.lifetime)
    return epsilon
