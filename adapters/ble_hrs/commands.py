"""``stresswatch pair | stream | record``: the user's companion commands for a BLE strap or watch.

Registered under the ``stresswatch.commands`` entry-point group; the core CLI never imports
this module by name. ``--replay FILE`` (hidden) replaces the radio with a recording, for
tests and for machines without Bluetooth.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from stresswatch.alerts.topics import Topics
from stresswatch.cli._common import AppContext, console, console_err, id_option, pass_app
from stresswatch.config import ingest_url_of
from stresswatch.errors import ConfigError, ParseError, StorageError, TransportError
from stresswatch.fsio import atomic_write, commit_rename

from .client import BleakHrsClient, BleError, DeviceInfo, HrsClient, ReplayClient, mask_address
from .buffer import StreamBuffer
from .parser import HEART_RATE_SERVICE_UUID, parse_heart_rate_measurement
from .recording import SUFFIX, RecordingWriter, read_recording
from .session import Gap, HrsSession
from .stream import DurablePublisher, IngestStreamer, StreamStats

DEVICE_FILE = "ble_device.json"
BUFFER_FILE = "ble_stream_buffer.sqlite"


def _client(replay: Path | None, speed: float = 0.0) -> HrsClient:
    if replay is not None:
        return ReplayClient(read_recording(replay), speed=speed)
    return BleakHrsClient()


def _device_path(app: AppContext) -> Path:
    return Path(app.settings.store.state_dir) / DEVICE_FILE


def load_enrolled(app: AppContext) -> dict[str, Any] | None:
    path = _device_path(app)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            raise ValueError("no address")
        return data
    except (ValueError, OSError) as exc:
        raise ParseError(f"unreadable paired-device file ({exc}); run `stresswatch pair` again", source=path) from None


def _save_enrolled(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")  # the old pairing stays until the new one is complete


def _install_stop(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            pass


# ---- pair -------------------------------------------------------------------------------

PAIR_EXAMPLES = """
\b
Examples:
  stresswatch pair                      # scan, pick from the list, verify, remember
  stresswatch pair --choose 1 --user alice
"""


@click.command("pair", epilog=PAIR_EXAMPLES)
@click.option("--user", callback=id_option("user"), help="Your user id (remembered with the device; `stream` uses it).")
@click.option("--choose", type=int, help="Pick device N from the list without asking.")
@click.option("--scan-s", default=10.0, show_default=True, help="How long to scan.")
@click.option("--verify-s", default=15.0, show_default=True, help="How long to wait for a first heart-rate notification.")
@click.option("--show-addresses", is_flag=True, help="Show full device addresses (masked by default).")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path), hidden=True)
@pass_app
def pair(
    app: AppContext, user: str | None, choose: int | None, scan_s: float, verify_s: float, show_addresses: bool, replay: Path | None
) -> None:
    """Find your heart-rate strap or watch, check that it sends data, and remember it.

    Lists devices advertising the Heart Rate Service (0x180D) with name, signal strength and
    services. Only the device you choose is ever connected to by `stream` and `record`.
    """
    client = _client(replay)
    devices = asyncio.run(client.scan(scan_s))
    if not devices:
        raise BleError("no heart-rate device found; wake the strap (wet the electrodes) and scan again")
    from rich.table import Table

    table = Table("#", "name", "RSSI (dBm)", "address", "services")
    for i, d in enumerate(devices, start=1):
        services = ", ".join("Heart Rate (180D)" if s.lower() == HEART_RATE_SERVICE_UUID else s for s in d.services)
        table.add_row(str(i), d.name or "?", str(d.rssi_dbm if d.rssi_dbm is not None else "?"), d.address if show_addresses else mask_address(d.address), services)
    console.print(table)
    if choose is None:
        choose = 1 if len(devices) == 1 else click.prompt("Device number", type=click.IntRange(1, len(devices)))
    if not 1 <= choose <= len(devices):
        raise click.BadParameter(f"choose 1..{len(devices)}", param_hint="--choose")
    device = devices[choose - 1]
    hr = asyncio.run(_verify(client, device, verify_s))
    console.print(f"[green]Notifications arrive[/green] from {device.name or 'the device'} (heart rate {hr}).")
    path = _device_path(app)
    record: dict[str, Any] = {
        "address": device.address,
        "name": device.name,
        "paired_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if user:
        record["user"] = user
    _save_enrolled(path, record)
    console.print(f"Remembered in {path}.")


async def _verify(client: HrsClient, device: DeviceInfo, verify_s: float) -> str:
    got: asyncio.Queue[bytes] = asyncio.Queue()
    await client.connect(device.address, lambda t: None)
    try:
        await client.subscribe(lambda data, t: got.put_nowait(data))
        deadline = asyncio.get_running_loop().time() + verify_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise BleError(f"no heart-rate notification within {verify_s:g} s; is the strap worn?")
            try:
                data = await asyncio.wait_for(got.get(), remaining)
            except asyncio.TimeoutError:
                continue
            try:
                m = parse_heart_rate_measurement(data, source="pairing")
            except ParseError:
                continue  # keep waiting for a well-formed one; a single bad frame is not a verdict
            return f"{m.hr_bpm} bpm" if m.hr_bpm is not None else "not yet locked"
    finally:
        await client.disconnect()


def _enrolled_or_fail(app: AppContext, device: str | None, replay: Path | None) -> tuple[str, dict[str, Any]]:
    if replay is not None:
        recorded = read_recording(replay).address
        if device and device.upper() != recorded.upper():
            raise ConfigError(f"--device {mask_address(device)} is not the recorded device ({mask_address(recorded)})")
        return recorded, {}
    if device:
        return device, {}
    enrolled = load_enrolled(app)
    if enrolled is None:
        raise ConfigError("no paired device: run `stresswatch pair` first (or pass --device ADDRESS)")
    return enrolled["address"], enrolled


# ---- stream -----------------------------------------------------------------------------

STREAM_EXAMPLES = """
\b
Examples:
  stresswatch stream --user alice --broker mqtt://engine.local:1883
  stresswatch stream --drain-only        # send what is still buffered, then exit
"""


@click.command("stream", epilog=STREAM_EXAMPLES)
@click.option("--user", callback=id_option("user"), help="Your user id (default: the one remembered by `pair`).")
@click.option("--broker", "broker_url", help="mqtt://HOST:PORT of the ingest broker (default: mqtt.ingest_url, else mqtt.url).")
@click.option("--device", help="Device address (default: the paired device).")
@click.option("--buffer", "buffer_path", type=click.Path(dir_okay=False, path_type=Path), help="SQLite buffer (default: in the state dir).")
@click.option("--batch-s", default=10.0, show_default=True, help="Seconds of data per ingest batch.")
@click.option("--drain-timeout", default=30.0, show_default=True, help="At the end, wait this long for the engine to confirm what is buffered.")
@click.option("--drain-only", is_flag=True, help="Do not connect to the device: send the buffer and exit.")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path), hidden=True)
@click.option("--replay-speed", default=0.0, hidden=True, help="0 = as fast as possible.")
@pass_app
def stream(
    app: AppContext,
    user: str | None,
    broker_url: str | None,
    device: str | None,
    buffer_path: Path | None,
    batch_s: float,
    drain_timeout: float,
    drain_only: bool,
    replay: Path | None,
    replay_speed: float,
) -> None:
    """Stream heart rate and beat-to-beat intervals to the engine, without losing any.

    Samples are buffered on disk (SQLite) first and removed only once the engine confirmed
    it has them on disk, so a broker crash or a network outage loses nothing; they are sent
    when it returns. Disconnects from the device and lost skin contact are recorded as gaps. Stop
    with Ctrl-C (what is buffered is sent before exit, up to --drain-timeout).
    """
    settings = app.settings
    url = broker_url or ingest_url_of(settings.mqtt)
    if not url:
        raise ConfigError("no broker: pass --broker or set mqtt.ingest_url (or mqtt.url)")
    buffer = StreamBuffer(buffer_path or Path(settings.store.state_dir) / BUFFER_FILE)
    publisher = DurablePublisher(
        url, buffer, username=settings.mqtt.username, password=settings.mqtt.password, protocol=settings.mqtt.protocol,
        confirm=True,
    )  # fmt: skip
    try:
        if not drain_only:
            address, enrolled = _enrolled_or_fail(app, device, replay)
            user = user or enrolled.get("user") or (read_recording(replay).user if replay else None)
            if not user:
                raise ConfigError("no user: pass --user (or pair with --user)")
            streamer = IngestStreamer(buffer, user=user, topics=Topics(settings.mqtt.prefix), batch_s=batch_s, on_buffered=publisher.pump)
            stats = asyncio.run(_stream(_client(replay, replay_speed), address, streamer, publisher))
            lost = sum(g.end_ns - g.start_ns for g in stats.gaps) / 1e9
            console_err.print(
                f"stream: {stats.notifications} notifications -> {stats.samples} samples in {stats.batches} batches; "
                f"{len(stats.gaps)} gap(s), {lost:.0f} s without data; {stats.rejected} malformed notification(s)"
            )
        if not publisher.drain(drain_timeout):
            raise TransportError(
                f"{buffer.count()} batch(es) not yet confirmed by the engine stay buffered in {buffer.path}; "
                "`stresswatch stream` sends them when the broker is back",
                url=publisher.url,
            )
        if publisher.acked:
            console_err.print(f"stream: all {publisher.acked} batch(es) confirmed by the engine through {publisher.url}")
        else:
            console_err.print("stream: nothing to send")
    finally:
        publisher.close()
        buffer.close()


async def _stream(client: HrsClient, address: str, streamer: IngestStreamer, publisher: DurablePublisher) -> StreamStats:
    session = HrsSession(client, address)
    _install_stop(session.stop)

    async def pump_forever() -> None:
        while True:
            await asyncio.sleep(0.2)
            publisher.pump()

    pumper = asyncio.get_running_loop().create_task(pump_forever())
    try:
        return await streamer.consume(session.run())
    finally:
        pumper.cancel()


# ---- record -----------------------------------------------------------------------------

RECORD_EXAMPLES = """
\b
Examples:
  stresswatch record --out morning.ble.jsonl --duration 300
  stresswatch replay morning.ble.jsonl --out out/
"""


@click.command("record", epilog=RECORD_EXAMPLES)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help=f"Recording file ({SUFFIX}).")
@click.option("--duration", "duration_s", type=float, help="Stop after this many seconds (default: Ctrl-C).")
@click.option("--device", help="Device address (default: the paired device).")
@click.option("--user", callback=id_option("user"), help="User id written into the recording header.")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path), hidden=True)
@pass_app
def record(app: AppContext, out_path: Path, duration_s: float | None, device: str | None, user: str | None, replay: Path | None) -> None:
    """Record the raw notification bytes with their arrival times (a fixture for replay and tests).

    The file is written as `OUT.partial` and renamed when the recording ends, so OUT is
    never half-written. The format is described in docs/BLE.md.
    """
    if out_path.exists():
        raise StorageError("exists; choose another --out (recordings are never overwritten)", path=out_path)
    address, enrolled = _enrolled_or_fail(app, device, replay)
    client = _client(replay)
    partial = out_path.with_name(out_path.name + ".partial")
    name = enrolled.get("name") if enrolled else (read_recording(replay).name if replay else None)
    writer = RecordingWriter(partial, address, name, user=user or enrolled.get("user"))
    try:
        gaps = asyncio.run(_record(client, address, writer, duration_s))
    except BaseException:
        writer.close()
        raise
    writer.close()
    commit_rename(partial, out_path)
    console_err.print(f"record: {writer.count} events written to {out_path}; {len(gaps)} gap(s)")


async def _record(client: HrsClient, address: str, writer: RecordingWriter, duration_s: float | None) -> list[Gap]:
    session = HrsSession(client, address, on_raw=writer.write)
    _install_stop(session.stop)
    start = client.clock.now_ns()
    if duration_s is not None and not isinstance(client, ReplayClient):
        asyncio.get_running_loop().call_later(duration_s, session.stop)  # the radio may go quiet
    async for _item in session.run():
        if duration_s is not None and client.clock.now_ns() - start >= duration_s * 1e9:
            session.stop()
    return session.gaps
