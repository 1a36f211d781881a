"""Writing into a cluster: an ingest batch into its user's partition, a user's consent into
the consent bucket. Used by the bridge (:mod:`.bridge`) and by anything that publishes to
JetStream directly."""

from __future__ import annotations

from .jetstream import JetStreamIO
from .layout import KIND_ACK, KIND_CHECKIN, KIND_ERASE, KIND_HEADER, KIND_LIST, MSG_ID_HEADER, REPLY_HEADER, USER_HEADER, Layout, partition_of


def ingest_headers(user: str, stream_id: str, seq: int) -> dict[str, str]:
    """The user (checked against the payload by the engine) and a message id JetStream drops
    a repeat of within its duplicate window (a companion re-sending after a lost PUBACK)."""
    return {USER_HEADER: user, MSG_ID_HEADER: f"{user}/{stream_id}/{seq}"}


def request_headers(kind: str, who: str, msg_id: str | None = None) -> dict[str, str]:
    """A worker's ack (``who`` = the worker), a user's check-in or erasure (``who`` = the user)."""
    h = {USER_HEADER: who, KIND_HEADER: kind}
    if msg_id is not None:
        h[MSG_ID_HEADER] = f"{kind}/{who}/{msg_id}"
    return h


def ack_partition(layout: Layout, worker: str, alert_id: str | None, indexed: int | None) -> int:
    """Pure: where a worker's ack goes. ``indexed``: the partition the alert index names for
    ``alert_id`` (None: not in the index). An alert the index does not know goes to a fixed
    partition all the same, whose owner answers "no alert ... for <worker>" exactly as the
    single engine does; a message without an alert id (a list request, or one that does not
    decode) goes to the worker's own partition."""
    if indexed is not None and 0 <= indexed < layout.partitions:
        return indexed
    return partition_of(alert_id if alert_id else worker, layout.partitions)


def publish_ack(jsio: JetStreamIO, layout: Layout, worker: str, payload: bytes, *, alert_id: str | None, request_id: str | None = None) -> int:
    """Route one worker message into the partition of the alert's user (by the alert index)
    and wait for JetStream's acknowledgement; returns its stream sequence."""
    entry = jsio.get(layout.alerts, alert_id) if alert_id else None
    p = ack_partition(layout, worker, alert_id, int(entry.value) if entry is not None and entry.value else None)
    return jsio.publish(layout.subject(p), payload, request_headers(KIND_ACK, worker, request_id))


def list_request(jsio: JetStreamIO, layout: Layout, worker: str, payload: bytes, *, request_id: str | None, timeout_s: float = 5.0) -> list[bytes]:
    """A worker's list request into every partition; the owners' answers (one per partition
    that has an owner within ``timeout_s``), to merge with :func:`.lists.merge_lists`."""
    messages = [
        (layout.subject(p), payload, request_headers(KIND_LIST, worker, f"{request_id}.{p}" if request_id else None))
        for p in range(layout.partitions)
    ]
    return jsio.scatter(messages, REPLY_HEADER, timeout_s)


def publish_checkin(jsio: JetStreamIO, layout: Layout, user: str, payload: bytes, *, checkin_id: str | None = None) -> int:
    return jsio.publish(layout.subject(partition_of(user, layout.partitions)), payload, request_headers(KIND_CHECKIN, user, checkin_id))


def publish_erase(jsio: JetStreamIO, layout: Layout, user: str) -> int:
    """Tell the owner of the user's partition to erase the user (after the consent key is gone)."""
    return jsio.publish(layout.subject(partition_of(user, layout.partitions)), b"", request_headers(KIND_ERASE, user))


def publish_ingest(jsio: JetStreamIO, layout: Layout, user: str, payload: bytes, *, stream_id: str, seq: int) -> int:
    """Publish one ingest batch and wait for JetStream's acknowledgement (stored on a quorum
    of replicas); returns its stream sequence."""
    return jsio.publish(layout.ingest_subject(user), payload, ingest_headers(user, stream_id, seq))


def put_consent(jsio: JetStreamIO, layout: Layout, user: str, message: bytes | None) -> int:
    """Store the user's consent message (``wire.consent``: every event), or delete it
    (``None``: erasure). Every engine's watch sees it; the gate reads it before each publish."""
    if message is None:
        jsio.delete(layout.consent, user)
        return 0
    return jsio.put(layout.consent, user, message)


__all__ = [
    "ack_partition", "ingest_headers", "list_request", "publish_ack", "publish_checkin", "publish_erase", "publish_ingest", "put_consent",
    "request_headers",
]  # fmt: skip
