"""A worker's ``alerts list`` in cluster mode (pure): the worker's alerts live in the outboxes
of every partition, so the bridge asks every partition's owner for its part and merges the
parts into the one :class:`~stresswatch.alerts.replies.Reply` the single engine would give."""

from __future__ import annotations

from ..alerts.replies import Reply
from ..wire.acks import AckAction


def merge_lists(parts: list[Reply], *, partitions: int, request_id: str | None, limit: int) -> Reply:
    """The worker's reply from the partitions' answers (one each; fewer if some partition had
    no owner in time). A request the owners refused gets their error; a list missing a
    partition is not given as complete: the worker is told to ask again."""
    refused = [r for r in parts if not r.ok]
    if refused:
        return refused[0].model_copy(update={"request_id": request_id})
    if len(parts) < partitions:
        return Reply(
            request_id=request_id, action=AckAction.LIST, ok=False,
            error=f"not answered: {partitions - len(parts)} of {partitions} partitions are changing owner; ask again in a few seconds",
        )  # fmt: skip
    alerts = sorted((a for r in parts for a in r.alerts or []), key=lambda a: (a.raised_at, a.alert_id), reverse=True)
    return Reply(request_id=request_id, action=AckAction.LIST, ok=True, alerts=alerts[:limit])


__all__ = ["merge_lists"]
