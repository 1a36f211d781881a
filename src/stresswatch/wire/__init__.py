"""Every wire message: decode + range checks (the one boundary), encode.

One module per message; each decoder is pure (bytes in, a frozen value out) and raises only
:class:`~stresswatch.errors.WireError` (a ``ParseError`` carrying ``field`` and ``reason``),
whatever the bytes. A message that decodes has passed every check of :mod:`.limits`, so it
can touch state (the detector's frame, the ledger, the outbox) without any later conversion
failing.

=================  ===========================================================================
module             message
=================  ===========================================================================
``ids``            the one id grammar (users, workers, groups, recipients, accounts, streams)
``limits``         the ranges: times, values, sizes; the payload cap the broker enforces
``json``           pydantic JSON -> ``WireError``
``binary``         the compact binary sample batch (``FF 53 57``)
``ingest``         ``{prefix}/ingest/{user}``: ``IngestBatch``, ``decode_ingest`` (JSON or binary)
``consent``        ``{prefix}/consent/{user}``: ``encode_consent``, ``decode_consent``
``acks``           ``{prefix}/acks/{worker}``: ``AckMessage`` (ack, resolve, list)
``checkin``        ``{prefix}/checkin/{user}``: ``CheckinMessage``, ``decode_checkin``
``rejections``     counting refused messages, one rate-limited log line per reason
=================  ===========================================================================

A new message gets its own module here: its pydantic model with the same checks (ids
through :mod:`.ids`, times through :mod:`.limits`, ``decode_json(..., max_bytes=...)``,
refusals through :func:`.json.refuse` with a reason code and no value in the message), a line
in the table above and in ``MAX_PAYLOAD_BYTES`` if it can be the largest; the engine counts
its refusals under its own kind in :class:`.rejections.Rejections`.

This package's ``__init__`` imports nothing, so the low layers (``alerts.topics``,
``consent.ledger``) can use :mod:`.ids` without pulling in the decoders.
"""
