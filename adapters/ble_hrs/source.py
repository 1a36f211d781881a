"""``stresswatch replay`` reads BLE recordings: the ``ble`` Source (suffix ``.ble.jsonl``).

The recording goes through the same session, state machine and parser as live data (the
fake client replays it on a virtual clock), so a replayed fixture yields exactly what
``stresswatch stream`` would have sent.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from .client import ReplayClient
from .recording import SUFFIX, read_recording
from .session import Gap, HrsSession, Reading, Rejected, SampleAssembler

log = logging.getLogger(__name__)


class BleRecordingSource:
    """Samples from a BLE recording, in batches of ``batch_notifications`` notifications.

    The user is ``user=`` if given, else the recording header's ``user``, else the file name
    without its suffix.
    """

    kind: ClassVar[str] = "ble"
    suffixes: ClassVar[tuple[str, ...]] = (SUFFIX,)

    def __init__(self, path: Path, *, user: str | None = None, batch_notifications: int = 600, **_: Any) -> None:
        self.path = Path(path)
        self.user = user
        self.batch_notifications = batch_notifications
        self.gaps: list[Gap] = []
        self.rejected: list[Rejected] = []

    async def __aiter__(self) -> AsyncIterator[pl.DataFrame]:
        recording = read_recording(self.path)
        user = self.user or recording.user or self.path.name.removesuffix(SUFFIX)
        session = HrsSession(ReplayClient(recording), recording.address, source_name=str(self.path))
        assembler = SampleAssembler(user=user, source=f"ble_hrs/{recording.name or 'device'}")
        readings = 0
        async for item in session.run():
            if isinstance(item, Gap):
                self.gaps.append(item)
            elif isinstance(item, Rejected):
                self.rejected.append(item)  # a live stream skips these too; say so below
            assembler.add(item)
            readings += isinstance(item, Reading)
            if readings >= self.batch_notifications:
                frame = assembler.ready()
                if frame.height:
                    yield frame
                readings = 0
        frame = assembler.flush()
        if frame.height:
            yield frame
        if self.rejected:
            log.warning("%s: skipped %d malformed notification(s); first: %s", self.path, len(self.rejected), self.rejected[0].error)
