"""``stresswatch import``: a vendor export into the samples store, or to the engine over MQTT.

The adapter is found through :class:`~stresswatch.sources.SourceRegistry` (entry points),
never by name. Parsing is staged completely before anything becomes visible: a parse error
anywhere in the export stores (or sends) nothing.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import polars as pl
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..alerts.topics import Topics
from ..alerts.transport import BrokerAddress, MqttTransport
from ..config import Settings, ingest_url_of
from ..errors import ConfigError, ParseError, StresswatchError, TransportError
from ..importing import ImportReport, input_fingerprints, parse_start_time
from ..ingest import MAX_BATCH_SAMPLES, IngestBatch, confirmation_of, read_confirmations
from ..wire.ingest import representable
from ..sources import Source, SourceRegistry
from ..store import AddResult, SampleStore, StagedAdd
from ._common import AppContext, console, console_err, id_option, pass_app, without_credentials

EPILOG = """
\b
Examples:
  stresswatch import fit ~/Downloads/2026-11-20-run.fit --user alice
  stresswatch import apple_health ~/Downloads/export.zip --user alice
  stresswatch import fitbit ~/MyFitbitData/ --user alice --tz Europe/London
  stresswatch import openmhealth points.json --user alice --publish
  stresswatch import table watch.csv --user alice --map time=timestamp --map value=hrm --metric hr_bpm
  stresswatch import fit run.fit --user alice --out /tmp/samples
"""

PUBLISH_BATCH = 10_000  # samples per MQTT message: well under IngestBatch's limit, ~300 kB JSON
assert PUBLISH_BATCH <= MAX_BATCH_SAMPLES


def _parse_map(items: tuple[str, ...]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"expected TARGET=COLUMN, got {item!r}", source="--map")
        mapping[key.strip()] = value.strip()
    return mapping


@dataclass
class UserFilter:
    """``--user`` on a file that names its own users (a samples file, a table with
    ``--map user=COLUMN``): only that user's rows are imported; the others are counted."""

    user: str
    other_rows: int = 0
    other_users: set[str] = field(default_factory=set)

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        mine = pl.col("user") == self.user
        others = batch.filter(~mine)
        if others.height:
            self.other_rows += others.height
            self.other_users.update(others.get_column("user").unique().to_list())
            batch = batch.filter(mine)
        return batch


def reading_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say how an adapter reads a file (shared by `import` and `replay`)."""
    for option in reversed(
        [
            click.option("--tz", help="Time zone of exports whose times carry none (Fitbit, naive CSV), e.g. Europe/Berlin. Default UTC."),
            click.option("--map", "maps", multiple=True, metavar="TARGET=COLUMN", help="table kind: which column holds time, value, metric, source, user."),
            click.option("--metric", type=click.Choice(["hr_bpm", "rr_ms", "steps", "motion"]), help="table kind: the metric of every row when no column holds it."),
            click.option("--time-unit", type=click.Choice(["auto", "s", "ms", "us", "ns"]), default="auto", show_default=True, help="table kind: unit of numeric times."),
            click.option(
                "--start-time",
                metavar="ISO",
                help="table kind: numeric times count from this moment (a recording's start; seconds unless --time-unit), e.g. 2026-11-20T09:30:00+01:00.",
            ),
        ]
    ):
        command = option(command)
    return command


def source_options(tz: str | None, maps: tuple[str, ...], metric: str | None, time_unit: str, start_time: str | None) -> dict[str, Any]:
    """The keyword options of :meth:`SourceRegistry.open` from :func:`reading_options`."""
    options: dict[str, Any] = {"tz": tz, "metric": metric, "time_unit": time_unit}
    if maps:
        options["mapping"] = _parse_map(maps)
    if start_time:
        options["start"] = parse_start_time(start_time, tz)
    return {k: v for k, v in options.items() if v is not None}


def run_import(
    source: Source,
    sink: StagedAdd,
    *,
    on_progress: Callable[[ImportReport], None] | None = None,
    keep: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
) -> AddResult:
    """Drain ``source`` into ``sink`` (each batch through ``keep`` if given) and commit;
    any error discards everything staged."""

    async def drain() -> None:
        async for batch in source:
            sink.add(keep(batch) if keep is not None else batch)
            report = getattr(source, "report", None)
            if on_progress is not None and report is not None:
                on_progress(report)

    with sink:
        asyncio.run(drain())
        return sink.commit()


def publish_store(store: SampleStore, settings: Settings, *, kind: str, confirm_timeout_s: float | None = 120.0) -> tuple[int, int]:
    """Send every sample in ``store`` as :class:`IngestBatch` messages; return (messages, samples).

    ``stream_id`` is derived from the data itself, so publishing the same import again sends
    the same (stream_id, seq) pairs and the engine's deduplicator drops them.

    ``confirm_timeout_s``: after the last publish, wait up to this long for the engine's
    confirmation of every batch on ``{prefix}/ingested/{user}`` (its digest, sent once the
    batch is in the engine's ingest log), as the companion does: the ingest broker's PUBACK
    is not enough, since it saves its store only every minute (docs/BROKER.md). A batch not
    confirmed in time raises :class:`TransportError` saying how many and that running the
    same import again is safe. ``None``: trust the broker's PUBACK.
    """
    url = ingest_url_of(settings.mqtt)  # the ingest broker when there is one (docs/BROKER.md)
    if not url:
        raise ConfigError("--publish needs a broker: set mqtt.url (e.g. --set mqtt.url=mqtt://host:1883)", field="mqtt.url")
    topics = Topics(settings.mqtt.prefix)
    digest = 0
    total = 0
    for user in store.users():
        for frame in store.frames(user):
            digest = (digest * 1_000_003 + int(frame.hash_rows(seed=0).sum())) % (1 << 64)
            total += frame.height
    stream_id = f"import-{kind}-{digest:016x}-{total}"[:64]
    confirmed: set[bytes] = set()
    lock = threading.Lock()
    arrived = threading.Condition(lock)

    def on_confirmation(topic: str, payload: bytes) -> None:  # paho's thread
        try:
            digests = read_confirmations(payload, source=topic)
        except StresswatchError:
            return  # not the engine's: ignored, as the companion does
        with arrived:
            confirmed.update(digests)
            arrived.notify_all()

    transport = MqttTransport(
        url,
        client_id=f"stresswatch-import-{uuid.uuid4().hex[:12]}",
        username=settings.mqtt.username,
        password=settings.mqtt.password,
        protocol=settings.mqtt.protocol,
        on_message=on_confirmation if confirm_timeout_s is not None else None,
    )
    seq = 0
    waiting: dict[bytes, str] = {}  # digest -> user, of batches sent and not yet confirmed
    try:
        users = store.users()
        if confirm_timeout_s is not None:
            transport.subscribe([topics.ingested(user) for user in users])  # before the first publish
        for user in users:
            topic = topics.ingest(user)
            for frame in store.frames(user):
                for (source_name,), part in frame.group_by("source", maintain_order=True):
                    part = representable(part)  # what the engine's boundary would refuse is not sent
                    for off in range(0, part.height, PUBLISH_BATCH):
                        chunk = part.slice(off, PUBLISH_BATCH)
                        payload = IngestBatch.from_frame(chunk, user=user, stream_id=stream_id, seq=seq, source=str(source_name)).encode()
                        waiting[confirmation_of(payload)] = user
                        _publish_acked(transport, topic, payload, user=user, sent=seq)
                        seq += 1
        if confirm_timeout_s is not None:
            _wait_confirmed(waiting, confirmed, arrived, confirm_timeout_s, topics=topics, url=transport.url)
    finally:
        try:
            transport.close()
        except TransportError:
            pass  # already reported by _publish_acked, which stopped at the first failure
    return seq, total


def _wait_confirmed(
    waiting: dict[bytes, str], confirmed: set[bytes], arrived: threading.Condition, timeout_s: float, *, topics: Topics, url: str
) -> None:
    deadline = time.monotonic() + timeout_s
    with arrived:
        while True:
            missing = [user for digest, user in waiting.items() if digest not in confirmed]
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                break
            arrived.wait(min(left, 1.0))
    if missing:
        where = ", ".join(sorted({topics.ingested(u) for u in missing})[:3])
        raise TransportError(
            f"{len(missing)} of {len(waiting)} batch(es) were accepted by the broker but no engine confirmed storing them "
            f"within {timeout_s:g} s (on {where}): is the engine running on this broker, and may this account read that "
            "topic (only the user's own account may)? Until the engine confirms, a crash of the ingest broker may lose them "
            "(docs/BROKER.md). Running the same import again is safe: batches already stored are dropped as copies",
            url=str(BrokerAddress.parse(url)),
        )


def _publish_acked(transport: MqttTransport, topic: str, payload: bytes, *, user: str, sent: int, timeout_s: float = 30.0) -> None:
    """Publish one batch and wait for the broker's answer: a refusal stops the import at once,
    naming the topic, instead of timing out after everything was queued."""
    receipt = transport.publish(topic, payload, qos=1)
    deadline = time.monotonic() + timeout_s
    accepted = f"{sent} message(s) before it were accepted; nothing after it was sent"
    hint = f"the account in mqtt.url may publish only its own user's ingest topic: give {user}'s account (mqtt://{user}:PASSWORD@HOST:PORT, docs/BROKER.md)"
    while not receipt.is_published():
        if not transport.connected:
            # mosquitto may drop a client right after refusing it (MQTT 3.1.1 has no refusal code)
            raise TransportError(f"the broker dropped the connection on the publish to {topic} (user {user}), probably not authorised; {hint}; {accepted}", url=str(BrokerAddress.parse(transport.url)))
        if time.monotonic() > deadline:
            raise TransportError(f"no acknowledgement for the publish to {topic} (user {user}) within {timeout_s:g} s; {accepted}", url=str(BrokerAddress.parse(transport.url)))
        time.sleep(0.005)
    try:
        transport.flush(timeout_s=1.0)  # raises with the broker's MQTT 5 reason when it refused
    except TransportError as exc:
        why = without_credentials(str(exc), transport.url)
        raise TransportError(f"the broker refused the publish to {topic} (user {user}): {why}; {hint}; {accepted}") from None


def _print_report(report: ImportReport | None, result: AddResult, *, where: str) -> None:
    """Per metric: rows read, kept, rejected, and of the kept ones new and already stored."""
    table = Table(title=f"import into {where}", show_header=True, header_style="bold")
    for col in ("metric", "read", "kept", "rejected", "new (stored)", "already stored"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    kept = dict(report.kept_by_metric) if report is not None else dict(result.read_by_metric)
    rejected = dict(report.rejected_by_metric) if report is not None else {}
    attributed = sum(rejected.values())
    for metric in sorted(set(kept) | set(rejected)):
        k, r = kept.get(metric, 0), rejected.get(metric, 0)
        a = result.added_by_metric.get(metric, 0)
        seen = result.read_by_metric.get(metric, 0)
        table.add_row(metric, f"{k + r:,}", f"{k:,}", f"{r:,}", f"{a:,}", f"{seen - a:,}")
    total_read = report.read if report is not None else result.read
    total_kept = report.kept if report is not None else result.read
    total_rejected = report.n_rejected if report is not None else 0
    if total_rejected > attributed:  # rows rejected before their metric was known (e.g. no time)
        r = total_rejected - attributed
        table.add_row("(metric unknown)", f"{r:,}", "0", f"{r:,}", "0", "0")
    table.add_row("all", f"{total_read:,}", f"{total_kept:,}", f"{total_rejected:,}", f"{result.added:,}", f"{result.duplicates:,}", style="bold")
    console.print(table)
    if report is not None and report.rejected:
        reasons = Table(title="rejected rows by reason", header_style="bold")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for reason, n in sorted(report.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            reasons.add_row(reason, f"{n:,}")
        console.print(reasons)


@click.command("import", epilog=EPILOG)
@click.argument("kind")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--user",
    required=True,
    callback=id_option("user"),
    help="Whose samples these are (stored and sent under this id). A file that names its own users "
    "(kind samples, or table with --map user=COLUMN) is filtered: only this user's rows are imported, "
    "the others are counted and left out.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Store root to import into (default: the state dir).")
@click.option("--publish", is_flag=True, help="Send the samples to the engine over MQTT (mqtt.ingest_url, else mqtt.url) instead of storing them.")
@click.option(
    "--confirm-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="With --publish: how long to wait for the engine to confirm it stored every batch (as the companion waits) before failing.",
)
@click.option("--trust-broker", is_flag=True, help="With --publish: finish on the broker's acknowledgement, without waiting for the engine's confirmation.")
@reading_options
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@pass_app
def import_(
    app: AppContext,
    kind: str,
    path: Path,
    user: str,
    out: Path | None,
    publish: bool,
    confirm_timeout: float,
    trust_broker: bool,
    tz: str | None,
    maps: tuple[str, ...],
    metric: str | None,
    time_unit: str,
    start_time: str | None,
    progress: bool | None,
) -> None:
    """Import a vendor export. KIND is an installed adapter: {kinds}.

    PATH is one file, the unpacked export folder, or the export's zip. Importing the same
    data twice adds nothing; a file that cannot be read stores nothing. Prints rows read,
    kept, rejected, new and already stored per metric, and the rejections by reason.

    With --publish, mqtt.url must carry the user's own account
    (mqtt://USER:PASSWORD@HOST:PORT): a batch the broker refuses stops the import at once,
    naming the topic. The import ends once the engine has confirmed storing every batch (it
    confirms on {prefix}/ingested/USER, as for the companion); --trust-broker ends on the
    broker's acknowledgement instead.
    """
    if out is not None and publish:
        raise click.UsageError("--out and --publish exclude each other")
    registry = SourceRegistry.discover()
    if kind not in registry.factories:
        raise ParseError(f"unknown kind {kind!r} (known: {', '.join(registry.kinds)})", source=path)
    options: dict[str, Any] = {"user": user, **source_options(tz, maps, metric, time_unit, start_time)}
    source = registry.open(path, kind=kind, **{k: v for k, v in options.items() if v is not None})
    settings = app.settings
    # what decides the rows a file becomes: the same file with other options is another copy
    parse_options = {"kind": kind, "tz": tz or "UTC", "metric": metric, "time_unit": time_unit, "map": dict(sorted(options.get("mapping", {}).items())), "start": options["start"].isoformat() if "start" in options else None}
    fingerprints = input_fingerprints(source, path)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if publish:
        tmp = tempfile.TemporaryDirectory(prefix="stresswatch-import-")
        store = SampleStore(tmp.name)
        where = "MQTT"
    else:
        store = SampleStore(out) if out is not None else SampleStore.from_settings(settings)
        where = str(store.dir)
        again = _check_not_imported_otherwise(store, user, fingerprints, parse_options)
    show = console_err.is_terminal if progress is None else progress
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console_err,
            disable=not show,
            transient=True,
        ) as bar:
            task = bar.add_task(f"import {kind}", total=None)

            def on_progress(report: ImportReport) -> None:
                bar.update(task, total=report.bytes_total or None, completed=report.bytes_done)

            only_user = UserFilter(user)
            result = run_import(source, store.stage(), on_progress=on_progress, keep=only_user)
        report = getattr(source, "report", None)
        if only_user.other_rows:
            n = len(only_user.other_users)
            console_err.print(
                f"--user {user}: imported only {user}'s rows; left out {only_user.other_rows:,} row(s) of {n} other user(s) in the file",
                markup=False,
                soft_wrap=True,
            )
        if result.read == 0 and only_user.other_rows:
            names = ", ".join(sorted(only_user.other_users)[:5]) + (", ..." if len(only_user.other_users) > 5 else "")
            raise ParseError(f"no rows of user {user!r} (the file holds {names}): pass one of them as --user", source=path, field="user")
        if publish:
            messages, samples = publish_store(store, settings, kind=kind, confirm_timeout_s=None if trust_broker else confirm_timeout)
            _print_report(report, result, where=where)
            stored = "accepted by the broker (not confirmed by the engine: --trust-broker)" if trust_broker else "stored by the engine (confirmed)"
            console.print(f"sent {samples:,} samples in {messages:,} message(s) to {settings.mqtt.prefix}/ingest/{user}: {stored}")
        else:
            _print_report(report, result, where=where)
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            store.record_imports(user, {h: {"file": name, "options": parse_options, "at": now} for h, name in fingerprints.items() if h not in again})
            for name, entry in again.values():
                console_err.print(f"{name}: imported before ({entry['at']}) with the same options: nothing doubled", markup=False, soft_wrap=True)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _describe(options: dict[str, Any]) -> str:
    parts = [f"--tz {options['tz']}"]
    if options.get("metric"):
        parts.append(f"--metric {options['metric']}")
    if options.get("time_unit") not in (None, "auto"):
        parts.append(f"--time-unit {options['time_unit']}")
    parts += [f"--map {k}={v}" for k, v in (options.get("map") or {}).items()]
    if options.get("start"):
        parts.append(f"--start-time {options['start']}")
    return " ".join(parts)


def _check_not_imported_otherwise(
    store: SampleStore, user: str, fingerprints: dict[str, str], options: dict[str, Any]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Refuse a file already imported for ``user`` with other options (its rows would be a
    second, shifted or relabelled copy); return the files imported before with the same ones."""
    log = store.import_log(user)
    same: dict[str, tuple[str, dict[str, Any]]] = {}
    for h, name in fingerprints.items():
        entry = log.get(h)
        if entry is None:
            continue
        if entry.get("options") == options:
            same[h] = (name, entry)
            continue
        before = entry.get("options") or {}
        raise ConfigError(
            f"refused, nothing stored: this file was imported for {user} on {entry.get('at')} as {entry.get('file')} "
            f"with {_describe(before)}; importing it again with {_describe(options)} would store a second copy of the same "
            f"readings (shifted in time or relabelled). Import it with the options it was imported with, or erase {user}'s data first",
            source=name,
        )
    return same


def _installed_kinds() -> str:
    from importlib.metadata import entry_points

    from ..sources import ENTRY_POINT_GROUP

    # names only: listing them must not import every adapter's dependencies
    return ", ".join(sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})) or "none"


import_.help = (import_.help or "").replace("{kinds}", _installed_kinds())
