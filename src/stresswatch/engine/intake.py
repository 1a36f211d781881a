"""The engine's ingest side: the receiver with manual acknowledgement, over the ingest log.

A batch reaches the engine thread only after it is on disk and its PUBACK is sent
(:mod:`.ingest_log`); at a restart the batches logged after the last snapshot are replayed
first, and every batch still in the log is known to the receiver's deduplicator, so a
redelivery whose PUBACK was lost in the crash is dropped, not processed twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..alerts.topics import Topics
from ..broker import private_client_id
from ..clock import Clock
from ..config import MqttSettings
from ..errors import ParseError
from ..ingest import Deduplicator, IngestBatch, IngestReceiver, Received
from ..wire import binary
from ..wire.limits import TimeWindow
from ..wire.rejections import Rejections
from .ingest_log import IngestLog, LogEntry

log = logging.getLogger("stresswatch.engine")

Deliver = Callable[[IngestBatch, int], None]  # (batch, its log sequence number)


class _Logged(NamedTuple):
    """A logged batch the restored state already holds: what de-duplication needs of it."""

    user: str
    stream_id: str
    seq: int


class Intake:
    def __init__(self, folder: Path, topics: Topics, deliver: Deliver) -> None:
        """``deliver``: called on the log's thread once a batch is durable and acknowledged
        (the engine queues it for its own thread)."""
        self.topics = topics
        self._deliver = deliver
        self.log = IngestLog(folder, self._durable)
        self.receiver: IngestReceiver | None = None
        self._kept: list[IngestBatch | _Logged] = []

    def recover(self, after_seq: int, apply: Deliver, *, held: Callable[[str, int], bool] | None = None) -> int:
        """Hand every logged batch after ``after_seq`` to ``apply`` (on the caller's thread),
        in order, except those ``held(user, seq)`` says the restored state already holds;
        returns how many. Records that no longer decode are skipped and counted."""
        dedup = Deduplicator()
        skipped = replayed = 0
        for rec in self.log.recover(0):
            covered = rec.seq <= after_seq
            ident = binary.identity(rec.payload) if covered or held is not None else None
            if ident is not None and (covered or (held is not None and held(ident[0], rec.seq))):
                # The restored state holds it: only its identity is needed, to recognise a
                # redelivery. Decoding every logged sample for that took ~30 s at 100,000 users.
                batch = _Logged(*ident)
                if not dedup.seen(batch):
                    dedup.first_time(batch)
                    self._kept.append(batch)
                continue
            try:
                batch = IngestBatch.decode(rec.payload, topic=self.topics.ingest(rec.user))
            except (ParseError, ValueError):
                skipped += 1
                continue
            if dedup.seen(batch):
                continue
            dedup.first_time(batch)
            self._kept.append(batch)
            if rec.seq > after_seq and not (held is not None and held(batch.user, rec.seq)):
                apply(batch, rec.seq)
                replayed += 1
        if skipped:
            log.warning("ingest log: skipped %d record(s) that no longer decode", skipped)
        return replayed

    def connect(
        self,
        url: str,
        mqtt: MqttSettings,
        protocol: str,
        *,
        clock: Clock,
        window: TimeWindow,
        rejections: Rejections,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        """Start the log and subscribe to ``url`` (the ingest broker; after :meth:`recover`);
        ``clock``, ``window`` and ``rejections``: the wire boundary's
        (:func:`stresswatch.wire.ingest.decode_ingest`); ``mqtt.ingest_reader`` picks the client."""
        self.log.start()
        self.receiver = IngestReceiver(
            url,
            lambda batch, rx: self.log.append(LogEntry(batch.user, rx.payload, (batch, rx))),
            topics=self.topics,
            username=mqtt.username,
            password=mqtt.password,
            protocol=protocol,
            client_id=private_client_id(f"{mqtt.client_id}-ingest", mqtt.password),
            manual_ack=True,
            reader=mqtt.ingest_reader,
            on_reconnect=on_reconnect,
            on_duplicate=lambda rx: self.log.append(LogEntry("", None, (None, rx))),
            seen=self._kept,
            clock=clock,
            window=window,
            rejections=rejections,
        )
        self._kept = []

    def _durable(self, entries: list[LogEntry]) -> None:
        for e in entries:
            batch, rx = e.ref  # type: ignore[misc]
            assert isinstance(rx, Received)
            rx.ack()  # the PUBACK, and the confirmation the companion waits for
        receiver = self.receiver
        if receiver is not None:
            receiver.flush()  # one write for the group's PUBACKs (bulk reader)
        for e in entries:
            batch = e.ref[0]  # type: ignore[index]
            if batch is not None:
                self._deliver(batch, e.seq)

    def close(self) -> None:
        """Sync and acknowledge what is logged, then disconnect (the broker keeps the rest)."""
        self.log.close()
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


__all__ = ["Intake"]
