"""nats-py on its own asyncio thread, with blocking calls for the engine thread.

The engine's loop, detector and SQLite outboxes stay on one ordinary thread, as in the
single-process engine; every JetStream request goes through :meth:`JetStreamIO.call`
(a coroutine run on the client's loop). Acknowledgements, publish-once markers and
window output are fire-and-forget (:meth:`JetStreamIO.submit`): the snapshot, not the
acknowledgement, is what a new owner trusts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ClusterError
from ..extras import require
from .layout import KIND_HEADER, KIND_INGEST, REPLY_HEADER, USER_HEADER, Layout
from .lease import Lease

log = logging.getLogger("stresswatch.cluster")
T = TypeVar("T")


@dataclass(frozen=True)
class Pulled:
    """One partition message: its stream sequence, the user header (a worker's id for an
    ack), the payload and its kind (``layout.KIND_*``)."""

    seq: int
    user: str
    payload: bytes
    kind: str = KIND_INGEST
    reply_to: str = ""  # a list request: where its owner answers (core NATS)


@dataclass
class Fetched:
    items: list[Pulled]
    last: Any  # the last nats message: acknowledging it acknowledges all before it (AckAll)


@dataclass(frozen=True)
class KvEntry:
    value: bytes | None
    revision: int


class JetStreamIO:
    def __init__(self, servers: list[str], layout: Layout, *, name: str, connect_timeout_s: float = 20.0) -> None:
        self._nats = require("nats", extra="cluster", feature="cluster mode")
        require("nats.js", extra="cluster", feature="cluster mode")
        self.layout = layout
        self.servers = servers
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats", daemon=True)
        self._thread.start()
        try:
            self.nc = self.call(
                self._nats.connect(
                    servers=servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.25, connect_timeout=2,
                    allow_reconnect=True, ping_interval=5, max_outstanding_pings=2, error_cb=_quiet, disconnected_cb=self._disconnected,
                    reconnected_cb=_reconnected,
                ),
                connect_timeout_s,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - any failure to connect is one line
            self._stop_loop()
            raise ClusterError(f"cannot connect to NATS {', '.join(servers)}: {type(exc).__name__} {exc}") from None
        self.js = self.nc.jetstream(timeout=10.0)  # a loaded host or a leader election: seconds
        self._kv: dict[str, Any] = {}
        self._obs: Any = None
        self._watchers: list[asyncio.Task[None]] = []
        self._later: list[concurrent.futures.Future[None]] = []

    # -- plumbing ----------------------------------------------------------------------
    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``coro`` on the client's loop and wait for it (engine thread). Any failure of
        NATS (a timeout, a server away, a refusal) is a :class:`ClusterError`."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout_s)
        except ClusterError:
            raise
        except Exception as exc:  # noqa: BLE001 - nats-py's and asyncio's errors: one type for the engine
            fut.cancel()
            raise ClusterError(f"NATS request failed: {type(exc).__name__} {exc}".strip()) from None

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` without waiting; a failure is logged (it is re-done or not needed)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        fut.add_done_callback(_log_failure)

    async def _disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS connection lost; reconnecting")

    def close(self) -> None:
        self._closing = True
        try:
            for t in self._watchers:
                self._loop.call_soon_threadsafe(t.cancel)
            self.call(self.nc.drain(), 10)
        except Exception as exc:  # noqa: BLE001 - closing: nothing left to protect
            log.debug("closing NATS: %s", exc)
        self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(5)
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            log.debug("stopping the NATS loop: %s", type(exc).__name__)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def connected_url(self) -> str:
        u = self.nc.connected_url
        return f"{u.hostname}:{u.port}" if u else "-"

    # -- setup -------------------------------------------------------------------------
    def ensure(self, retention_s: float) -> None:
        """Create (or find) the stream, buckets and object store; refuse another layout."""
        self.call(self._ensure(retention_s), 60)

    async def _ensure(self, retention_s: float) -> None:
        api = self._nats.js.api
        L = self.layout
        for name, subjects in ((L.stream, L.ingest_subjects), (L.windows_stream, f"{L.windows_root}.*")):
            cfg = api.StreamConfig(
                name=name, subjects=[subjects], retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE,
                num_replicas=L.replicas, max_age=retention_s, duplicate_window=120.0, discard=api.DiscardPolicy.OLD,
            )  # fmt: skip
            await self._add_or_find_stream(cfg)
        for bucket, ttl, history in ((L.leases, None, 1), (L.consent, None, 1), (L.sent, retention_s, 1), (L.state, None, 1), (L.alerts, retention_s, 1)):
            self._kv[bucket] = await self._kv_bucket(bucket, ttl, history)
        try:
            self._obs = await self.js.object_store(L.snapshots)
        except self._nats.js.errors.NotFoundError:
            self._obs = await self.js.create_object_store(L.snapshots, config=api.ObjectStoreConfig(bucket=L.snapshots, replicas=L.replicas))
        state = self._kv[L.state]
        want = str(L.partitions).encode()
        try:
            await state.create("layout.partitions", want)
        except self._nats.js.errors.KeyWrongLastSequenceError:
            have = (await state.get("layout.partitions")).value
            if have != want:
                raise ClusterError(f"the cluster has {have.decode()} partitions; this engine is configured for {L.partitions}") from None

    async def _add_or_find_stream(self, cfg: Any) -> None:
        try:
            await self.js.add_stream(cfg)
        except self._nats.js.errors.BadRequestError:
            await self.js.stream_info(cfg.name)  # exists (possibly with other limits): use it

    async def _kv_bucket(self, bucket: str, ttl: float | None, history: int) -> Any:
        try:
            return await self.js.key_value(bucket)
        except self._nats.js.errors.BucketNotFoundError:
            cfg = self._nats.js.api.KeyValueConfig(bucket=bucket, history=history, ttl=ttl, replicas=self.layout.replicas)
            return await self.js.create_key_value(cfg)

    def kv(self, bucket: str) -> Any:
        """The bucket's handle (not from the client's own thread: coroutines use :meth:`_bucket`)."""
        return self._kv.get(bucket) or self.call(self._bucket(bucket))

    async def _bucket(self, bucket: str) -> Any:
        if bucket not in self._kv:
            self._kv[bucket] = await self.js.key_value(bucket)
        return self._kv[bucket]

    # -- key-value ---------------------------------------------------------------------
    def get(self, bucket: str, key: str) -> KvEntry | None:
        return self.call(self._get(bucket, key))

    async def _get(self, bucket: str, key: str) -> KvEntry | None:
        try:
            e = await (await self._bucket(bucket)).get(key)
        except self._nats.js.errors.KeyNotFoundError:  # also deleted / purged keys
            return None
        return KvEntry(e.value, e.revision)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The bucket's keys starting with ``prefix`` (none for an empty bucket)."""
        return self.call(self._keys(bucket, prefix))

    async def _keys(self, bucket: str, prefix: str) -> list[str]:
        try:
            keys = await (await self._bucket(bucket)).keys()
        except self._nats.js.errors.NoKeysError:
            return []
        return [k for k in keys if k.startswith(prefix)]

    def put(self, bucket: str, key: str, value: bytes) -> int:
        return self.call(self.kv(bucket).put(key, value))

    def cas(self, bucket: str, key: str, value: bytes, last: int | None) -> int | None:
        """Create (``last`` None) or update at revision ``last``; None if someone else wrote first."""
        return self.call(self._cas(bucket, key, value, last))

    async def _cas(self, bucket: str, key: str, value: bytes, last: int | None) -> int | None:
        kv = await self._bucket(bucket)
        errors = self._nats.js.errors
        try:
            if last is None:
                return await kv.create(key, value)
            return await kv.update(key, value, last=last)
        except (errors.KeyWrongLastSequenceError, errors.APIError):
            return None

    def delete(self, bucket: str, key: str, last: int | None = None) -> None:
        self.call(self.kv(bucket).delete(key, last=last))

    def leases(self, keys: list[str]) -> dict[str, tuple[Lease | None, int | None]]:
        """Every key's lease and revision (None, None when absent), in one round trip each,
        concurrently."""
        return self.call(self._leases(keys))

    async def _leases(self, keys: list[str]) -> dict[str, tuple[Lease | None, int | None]]:
        got = await asyncio.gather(*(self._get(self.layout.leases, k) for k in keys))
        return {k: ((Lease.decode(e.value), e.revision) if e is not None else (None, None)) for k, e in zip(keys, got, strict=True)}

    def watch(self, bucket: str, on_entry: Callable[[str, bytes | None, int], None], timeout_s: float = 30.0) -> None:
        """Call ``on_entry(key, value or None if deleted, revision)`` for every key now and every
        change after (on the client's thread); returns once the present values were given."""
        ready = threading.Event()
        self.call(self._start_watch(bucket, on_entry, ready))
        if not ready.wait(timeout_s):
            raise ClusterError(f"the {bucket} bucket did not load within {timeout_s:g} s")

    async def _start_watch(self, bucket: str, on_entry: Callable[[str, bytes | None, int], None], ready: threading.Event) -> None:
        watcher = await (await self._bucket(bucket)).watchall()
        self._watchers.append(asyncio.ensure_future(self._watch(watcher, on_entry, ready)))

    async def _watch(self, watcher: Any, on_entry: Callable[[str, bytes | None, int], None], ready: threading.Event) -> None:
        timeout = self._nats.errors.TimeoutError
        while True:
            try:
                e = await watcher.updates(timeout=5.0)
            except timeout:
                continue
            except Exception as exc:  # noqa: BLE001 - keep watching through reconnects
                log.warning("consent watch: %s", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if e is None:
                ready.set()
                continue
            try:
                on_entry(e.key, None if e.operation in ("DEL", "PURGE") else e.value, e.revision)
            except Exception as exc:  # noqa: BLE001 - one bad value must not stop the watch
                log.warning("watch of %s: %s", e.key, type(exc).__name__)

    # -- ingest ------------------------------------------------------------------------
    def open_partition(self, p: int, after_seq: int) -> Any:
        """A fresh durable pull consumer for partition ``p`` from ``after_seq + 1`` (acknowledge
        all, by the last message taken)."""
        return self.call(self._open_partition(p, after_seq))

    async def _open_partition(self, p: int, after_seq: int) -> Any:
        api, L = self._nats.js.api, self.layout
        name = L.consumer(p)
        try:
            await self.js.delete_consumer(L.stream, name)
        except self._nats.js.errors.NotFoundError:
            pass
        policy = api.DeliverPolicy.BY_START_SEQUENCE if after_seq > 0 else api.DeliverPolicy.ALL
        cfg = api.ConsumerConfig(
            durable_name=name, filter_subject=L.subject(p), ack_policy=api.AckPolicy.ALL, ack_wait=120.0,
            deliver_policy=policy, opt_start_seq=after_seq + 1 if after_seq > 0 else None, max_ack_pending=-1,
            max_deliver=-1, max_waiting=64,
        )  # fmt: skip
        await self.js.add_consumer(L.stream, cfg)
        return await self.js.pull_subscribe_bind(durable=name, stream=L.stream)

    def close_partition(self, sub: Any) -> None:
        try:
            self.call(sub.unsubscribe(), 5)
        except Exception as exc:  # noqa: BLE001 - the consumer is replaced by the next owner anyway
            log.debug("unsubscribe: %s", exc)

    def fetch(self, subs: dict[int, Any], batch: int, timeout_s: float) -> dict[int, Fetched]:
        """Up to ``batch`` messages of each partition, concurrently; waits at most ``timeout_s``
        for a partition with nothing new."""
        if not subs:
            return {}
        return self.call(self._fetch(subs, batch, timeout_s), timeout_s + 30)

    async def _fetch(self, subs: dict[int, Any], batch: int, timeout_s: float) -> dict[int, Fetched]:
        timeout = self._nats.errors.TimeoutError

        async def one(p: int, sub: Any) -> tuple[int, list[Any]]:
            try:
                return p, await sub.fetch(batch, timeout=timeout_s)
            except timeout:
                return p, []
            except Exception as exc:  # noqa: BLE001 - a server away: the next call tries again
                log.warning("partition %d: fetch failed (%s)", p, type(exc).__name__)
                await asyncio.sleep(0.2)
                return p, []

        out: dict[int, Fetched] = {}
        for p, msgs in await asyncio.gather(*(one(p, s) for p, s in subs.items())):
            if msgs:
                # NATS's MQTT listener: the server's mapping put the topic's user in the subject,
                # which no client can change (an MQTT 3.1.1 client cannot set headers either)
                user_of = self.layout.user_of
                items = [
                    Pulled(
                        m.metadata.sequence.stream, user_of(m.subject) or (m.headers or {}).get(USER_HEADER, ""), m.data,
                        (m.headers or {}).get(KIND_HEADER, KIND_INGEST), (m.headers or {}).get(REPLY_HEADER, ""),
                    )  # fmt: skip
                    for m in msgs
                ]
                out[p] = Fetched(items, msgs[-1])
        return out

    def ack(self, msg: Any) -> None:
        self.submit(msg.ack())

    def purge_before(self, p: int, seq: int) -> None:
        """Drop partition ``p``'s ingest below ``seq`` (a snapshot covers it)."""
        self.submit(self.js.purge_stream(self.layout.stream, subject=self.layout.subject(p), seq=seq))

    def purge_through(self, p: int, seq: int) -> None:
        """Drop partition ``p``'s messages up to and including ``seq`` now (erasure: a snapshot
        taken at ``seq`` covers them); waits for the stream's answer."""
        self.call(self.js.purge_stream(self.layout.stream, subject=self.layout.subject(p), seq=seq + 1))

    def partition_info(self, p: int) -> tuple[int, int | None]:
        """(the partition's last stream sequence, or 0; the owner's consumer's pending count:
        not yet delivered plus not yet acknowledged, None without a consumer)."""
        return self.call(self._partition_info(p))

    async def _partition_info(self, p: int) -> tuple[int, int | None]:
        L = self.layout
        try:
            last = int((await self.js.get_last_msg(L.stream, L.subject(p))).seq)
        except self._nats.js.errors.NotFoundError:  # none, or all purged behind a snapshot
            last = 0
        try:
            ci = await self.js.consumer_info(L.stream, L.consumer(p))
        except self._nats.js.errors.NotFoundError:
            return last, None
        last = max(last, int(ci.delivered.stream_seq or 0))
        return last, int(ci.num_pending or 0) + int(ci.num_ack_pending or 0)

    def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        """A JetStream publish, waiting for the stream's acknowledgement; its sequence."""
        return self.call(self.js.publish(subject, payload, headers=headers)).seq

    def publish_later(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        *,
        then: Callable[[], object] | None = None,
        give_up_s: float | None = 60.0,
    ) -> None:
        """A JetStream publish in the background, repeated (same message id) until the stream
        acknowledges it, through a server's loss; then ``then()`` (on the client's thread).
        ``give_up_s`` None: never give up. :meth:`wait_published` waits for all of them."""
        self._later = [f for f in self._later if not f.done()]
        coro = self._publish_retrying(subject, payload, headers, then, give_up_s)
        self._later.append(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _publish_retrying(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, then: Callable[[], object] | None, give_up_s: float | None
    ) -> None:
        deadline = None if give_up_s is None else self._loop.time() + give_up_s
        while deadline is None or self._loop.time() < deadline:
            try:
                await self.js.publish(subject, payload, timeout=5, headers=headers)
            except Exception:  # noqa: BLE001 - a server away or a leader election: again
                await asyncio.sleep(0.5)
                continue
            if then is not None:
                then()
            return
        log.warning("a publish to %s was not acknowledged for %g s; given up", subject, give_up_s)

    def publish_core(self, subject: str, payload: bytes) -> None:
        """A plain NATS publish (no stream), in the background: an answer to a waiting requester."""
        self.submit(self.nc.publish(subject, payload))

    def scatter(self, messages: list[tuple[str, bytes, dict[str, str]]], reply_header: str, timeout_s: float) -> list[bytes]:
        """Publish ``messages`` into the stream, each carrying a fresh inbox in ``reply_header``,
        and collect the answers sent to that inbox: one per message, or what came within
        ``timeout_s``."""
        return self.call(self._scatter(messages, reply_header, timeout_s), timeout_s + 30)

    async def _scatter(self, messages: list[tuple[str, bytes, dict[str, str]]], reply_header: str, timeout_s: float) -> list[bytes]:
        inbox = self.nc.new_inbox()
        got: list[bytes] = []
        done = asyncio.Event()

        async def on_answer(msg: Any) -> None:
            got.append(msg.data)
            if len(got) >= len(messages):
                done.set()

        sub = await self.nc.subscribe(inbox, cb=on_answer)
        try:
            for subject, payload, headers in messages:
                await self.js.publish(subject, payload, headers={**headers, reply_header: inbox})
            try:
                await asyncio.wait_for(done.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            return list(got)
        finally:
            await sub.unsubscribe()

    def wait_published(self, timeout_s: float = 60.0) -> None:
        concurrent.futures.wait(self._later, timeout_s)
        self._later = [f for f in self._later if not f.done()]

    # -- snapshots ---------------------------------------------------------------------
    def put_object(self, name: str, data: bytes) -> None:
        assert self._obs is not None, "ensure() first"
        self.call(self._obs.put(name, data), 120)

    def get_object(self, name: str) -> bytes | None:
        return self.call(self._get_object(name), 120)

    async def _get_object(self, name: str) -> bytes | None:
        if self._obs is None:
            self._obs = await self.js.object_store(self.layout.snapshots)
        try:
            return bytes((await self._obs.get(name)).data)
        except (self._nats.js.errors.ObjectNotFoundError, self._nats.js.errors.NotFoundError):
            return None


async def _quiet(exc: Exception) -> None:
    log.debug("NATS: %s", type(exc).__name__)


async def _reconnected() -> None:
    log.info("NATS reconnected")


def open_ready(servers: list[str], layout: Layout, *, name: str, retention_s: float, timeout_s: float = 60.0) -> JetStreamIO:
    """Connect and :meth:`~JetStreamIO.ensure` the cluster's objects, retrying while the servers
    start or JetStream elects its leaders (a fresh cluster takes seconds); a layout conflict is
    not retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            jsio = JetStreamIO(servers, layout, name=name)
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        try:
            jsio.ensure(retention_s)
            return jsio
        except ClusterError as exc:
            jsio.close()
            if "partitions" in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _log_failure(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("background NATS call failed: %s", type(fut.exception()).__name__)


__all__ = ["Fetched", "JetStreamIO", "KvEntry", "Pulled", "open_ready"]
