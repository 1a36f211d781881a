"""Writing into a cluster: an ingest batch into its user's partition, a user's consent into
the consent bucket. Used by the bridge (:mod:`.bridge`) and by anything that publishes to
JetStream directly."""

from __future__ import annotations

from .jetstream import JetStreamIO
from .layout import MSG_ID_HEADER, USER_HEADER, Layout


def ingest_headers(user: str, stream_id: str, seq: int) -> dict[str, str]:
    """The user (checked against the payload by the engine) and a message id JetStream drops
    a repeat of within its duplicate window (a companion re-sending after a lost PUBACK)."""
    return {USER_HEADER: user, MSG_ID_HEADER: f"{user}/{stream_id}/{seq}"}


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


__all__ = ["ingest_headers", "publish_ingest", "put_consent"]
