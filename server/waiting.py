"""Bounded waits: for institutions to join, and for their replies within a round.

Flower's strategies wait, without limit, until ``min-available`` nodes are connected
(polling ``Grid.get_node_ids`` every second), both at the start and in every later
round. :class:`PatientGrid` passes everything through to the real grid but raises
:class:`JoinTimeoutError` once fewer than the minimum have been connected for longer
than ``join-timeout`` seconds.

Within a round, Flower's ``send_and_receive`` waits for every reply up to the round
timeout and silently drops whatever comes later. :class:`PatientGrid` instead goes on
``straggler-timeout`` seconds after ``min-train`` institutions have replied, names every
institution it stopped waiting for (or that the SuperLink reports as gone), and keeps
asking for the missing replies: when one arrives in a later round it is logged and
counted as late, never aggregated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

#: Seconds between two pulls for the replies still owed in a round. Flower's own grid
#: sleeps 3 s between pulls; a pull of a few message ids on the SuperLink is cheap, and
#: every second waited here is added to every round (once per train or evaluate message).
REPLY_POLL_SECONDS = 0.1

#: Node id the SuperLink uses as the sender of replies it generates itself (e.g. when
#: the destination stopped sending heartbeats).
SUPERLINK_NODE_ID = 1


@dataclass(frozen=True)
class Missing:
    """A reply a round stopped waiting for, or that arrived after its round closed."""

    node_id: int
    server_round: int
    message_type: str
    reason: str


class JoinTimeoutError(RuntimeError):
    """Too few institutions stayed connected for too long."""


def _round_of(msg: Message) -> int:
    """The round a strategy's message belongs to (its config's ``server-round``)."""
    config = msg.content.config_records.get("config")
    if config is not None and "server-round" in config:
        return int(config["server-round"])
    return int(msg.metadata.group_id or 0)


class PatientGrid:
    """Delegate to ``grid``; fail when short of ``minimum`` nodes for over ``timeout`` s."""

    def __init__(self, grid: Grid, minimum: int, timeout: float, *, min_replies: int = 1,
                 straggler_timeout: float = 0.0,
                 on_missing: Callable[[Missing], None] | None = None,
                 on_late: Callable[[Missing, int], None] | None = None,
                 on_progress: Callable[[int, str, int, int], None] | None = None,
                 on_train_reply: Callable[[Message], Message] | None = None,
                 poll_seconds: float = REPLY_POLL_SECONDS) -> None:
        self._grid, self.minimum, self.timeout = grid, minimum, timeout
        self.min_replies, self.straggler_timeout = min_replies, straggler_timeout
        self._on_missing = on_missing or (lambda m: None)
        self._on_late = on_late or (lambda m, r: None)
        self._on_progress = on_progress or (lambda r, t, n, m: None)
        self._on_train_reply = on_train_reply or (lambda m: m)
        self.poll_seconds = poll_seconds
        self._short_since: float | None = None
        self.flag = "--min-available"  # the setting ``minimum`` comes from
        self._pending: dict[str, Missing] = {}  # message id → the reply still owed
        self._round = 0

    def get_node_ids(self) -> Iterable[int]:
        """The connected node ids; raises once too few have lasted past the timeout."""
        ids = list(self._grid.get_node_ids())
        if len(ids) >= self.minimum or self.timeout <= 0:
            self._short_since = None
            return ids
        now = time.monotonic()
        self._short_since = self._short_since or now
        if now - self._short_since > self.timeout:
            raise JoinTimeoutError(
                f"only {len(ids)} of the {self.minimum} institutions needed "
                f"({self.flag}) were connected for {self.timeout:g} s (--join-timeout); "
                "check that each institution runs flower-client with its kit, that its key "
                "is on the allow-list, and that it can reach this coordinator"
            )
        return ids

    def wait_until_joined(self, poll_seconds: float = 1.0) -> int:
        """Block until ``minimum`` nodes are connected (or raise); return how many are."""
        while len(ids := list(self.get_node_ids())) < self.minimum:
            time.sleep(poll_seconds)
        return len(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; collect replies until all, the straggler or the round timeout.

        Replies the SuperLink generates for a node that stopped sending heartbeats are
        reported as dropped and not returned; replies still missing at the end are
        reported and pulled again with every later call (late replies). Each training
        reply goes through ``on_train_reply`` as it arrives (the strategy folds it in).
        """
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        owed: dict[str, Missing] = {}
        for mid, msg in zip(ids, messages, strict=True):
            if mid:
                server_round = _round_of(msg)
                self._round = max(self._round, server_round)
                owed[mid] = Missing(msg.metadata.dst_node_id, server_round,
                                    msg.metadata.message_type, "")
        self.collect_late()
        replies: list[Message] = []
        started, enough_since, why = time.monotonic(), None, ""
        first = next(iter(owed.values()), None)
        expected = len(owed)
        reported = -1
        while owed:
            if first is not None and expected - len(owed) != reported:
                reported = expected - len(owed)
                self._on_progress(first.server_round, first.message_type, reported, expected)
            for reply in self._grid.pull_messages(list(owed)):
                sent = owed.pop(reply.metadata.reply_to_message_id, None)
                if sent is None:
                    continue
                if reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                    self._on_missing(Missing(sent.node_id, sent.server_round,
                                             sent.message_type, reply.error.reason))
                elif sent.message_type == MessageType.TRAIN:
                    replies.append(self._on_train_reply(reply))  # e.g. fold it in now
                else:
                    replies.append(reply)
            now = time.monotonic()
            if enough_since is None and sum(not r.has_error() for r in replies) >= \
                    self.min_replies:
                enough_since = now
            if not owed:
                break
            if timeout is not None and now - started >= timeout:
                why = f"no reply within the round timeout ({timeout:g} s, --round-timeout)"
            elif (enough_since is not None and self.straggler_timeout > 0
                  and now - enough_since >= self.straggler_timeout):
                why = (f"no reply {self.straggler_timeout:g} s after {self.min_replies} "
                       "institution(s) had replied (--straggler-timeout)")
            if why:
                break
            time.sleep(self.poll_seconds)
        for mid, sent in owed.items():
            self._pending[mid] = sent
            self._on_missing(Missing(sent.node_id, sent.server_round, sent.message_type, why))
        return replies

    def collect_late(self) -> int:
        """Pull replies owed from earlier rounds; report each as late; return how many."""
        if not self._pending:
            return 0
        count = 0
        for reply in self._grid.pull_messages(list(self._pending)):
            sent = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if sent is None:
                continue
            count += 1
            reason = reply.error.reason if reply.has_error() else "an update"
            self._on_late(Missing(sent.node_id, sent.server_round, sent.message_type, reason),
                          self._round)
        return count
