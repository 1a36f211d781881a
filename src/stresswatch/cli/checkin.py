"""``stresswatch checkin``: the person asks for contact themselves (reason ``self_report``).

Offline-first: the check-in is committed to a queue file before anything is sent and removed
only after the broker's PUBACK; the engine records each check-in id once.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import click

from ..alerts.checkin import CheckinQueue
from ..wire.checkin import NOTE_MAX
from ..alerts.topics import Topics, check_id
from ..mqtt import connect
from ..consent.ledger import ConsentLedger
from ..consent.state import Status
from ..errors import ConfigError, StresswatchError, TransportError
from ..model import AlertLevel
from ._common import AppContext, console, console_err, id_option, pass_app

EPILOG = """
\b
Examples:
  stresswatch checkin --user alice --broker mqtt://alice:PASSWORD@127.0.0.1:1883
  stresswatch checkin --user alice --note "could someone call after 6?" --level high
  stresswatch checkin --user alice --send-queued      # send what was queued while offline
"""


@click.command(epilog=EPILOG)
@click.option("--user", required=True, callback=id_option("user"), help="Your user id.")
@click.option("--note", help=f"A few words for the workers you chose (at most {NOTE_MAX} characters).")
@click.option("--level", type=click.Choice([lv.value for lv in AlertLevel]), default=AlertLevel.ELEVATED.value, show_default=True, help="How much you would welcome contact.")
@click.option("--broker", metavar="URL", help="mqtt://HOST:PORT (default: mqtt.url from settings).")
@click.option("--queue-file", type=click.Path(dir_okay=False, path_type=Path), help="Where check-ins wait until sent (default: in store.state_dir).")
@click.option("--wait-s", type=float, default=10.0, show_default=True, help="Try this long to reach the broker, then leave the check-in queued.")
@click.option("--send-queued", is_flag=True, help="Do not add a check-in: only send those still queued.")
@pass_app
def checkin(
    app: AppContext, user: str, note: str | None, level: str, broker: str | None, queue_file: Path | None, wait_s: float, send_queued: bool
) -> None:
    """Ask your chosen support workers to reach out to you, now.

    It travels the same consent path as an alert from your tracker: only the workers you
    chose (`stresswatch consent grant --to ...`) receive it, your quiet hours hold, and it is
    in your `stresswatch export`. Without a connection it waits on disk and is sent once,
    the next time this command reaches the broker.
    """
    check_id("user", user)
    s = app.settings.mqtt
    if s.username and s.username != user:
        raise ConfigError(f"--user {user} but the broker account is {s.username!r}: you can check in only as yourself", field="--user")
    if note is not None and len(note) > NOTE_MAX:
        raise click.BadParameter(f"{len(note)} characters; at most {NOTE_MAX}", param_hint="--note")
    url = broker or s.url
    now = datetime.now(timezone.utc)
    path = queue_file or app.settings.store.state_dir / "checkin-queue.sqlite"
    with CheckinQueue(path) as queue:
        if not send_queued:
            _warn_without_consent(app, user, now)
            try:
                msg = queue.add(user, now=now, level=AlertLevel(level), note=note)
            except ValueError as exc:  # the message model refused the note (control characters)
                raise click.BadParameter(str(exc).splitlines()[-1], param_hint="--note") from None
            console.print(f"check-in {msg.checkin_id} saved", markup=False)
        for q in queue.drop_stale(now):
            console_err.print(f"check-in from {q.at:%Y-%m-%d %H:%M} UTC was never sent and is now too old: not sent (ask again)", markup=False)
        pending = queue.pending(user)
        if not pending:
            console.print("nothing queued", markup=False)
            return
        if not url:
            raise ConfigError(f"no broker: pass --broker or set mqtt.url ({len(pending)} check-in(s) stay queued in {path})", field="mqtt.url")
        sent = _send(url, app, user, pending, queue, wait_s)
        console.print(f"sent {sent} check-in(s): your chosen workers will be asked to reach out", markup=False)


def _warn_without_consent(app: AppContext, user: str, now: datetime) -> None:
    try:
        with ConsentLedger(app.settings.store.db_path) as ledger:
            st = ledger.state(user)
    except StresswatchError:
        return
    if st.status is not Status.ACTIVE or not st.recipients:
        console_err.print(
            f"note: this computer's consent record for {user} is {st.status.value}: the engine sends a check-in only to"
            " workers you chose (`stresswatch consent grant --user U --to W`)",
            markup=False,
        )


def _send(url: str, app: AppContext, user: str, pending: list, queue: CheckinQueue, wait_s: float) -> int:
    s = app.settings.mqtt
    topic = Topics(s.prefix).checkin(user)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client = connect(url, f"stresswatch-checkin-{user}", username=s.username, password=s.password, protocol=s.protocol, timeout_s=max(1.0, min(5.0, wait_s)))
            break
        except TransportError as exc:
            if "refused" in str(exc) or time.monotonic() >= deadline:
                raise TransportError(
                    f"{exc}; {len(pending)} check-in(s) stay queued and are sent by the next"
                    f" `stresswatch checkin --user {user} --send-queued`"
                ) from None
            time.sleep(1.0)
    refused: dict[int, str] = {}
    client.on_publish = lambda c, u, mid, reason=None, props=None: (
        refused.__setitem__(mid, str(reason)) if getattr(reason, "is_failure", False) else None
    )
    sent = 0
    try:
        for q in pending:
            info = client.publish(topic, q.payload, qos=1)
            try:
                info.wait_for_publish(max(1.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                break
            if not info.is_published():
                break
            if info.mid in refused:
                raise TransportError(f"the broker refused the check-in on {topic!r}: {refused[info.mid]} (is this {user}'s account?)")
            queue.sent(q.checkin_id)  # acknowledged by the broker: the engine's persistent session has it
            sent += 1
    finally:
        client.disconnect()
        client.loop_stop()
    if sent < len(pending):
        raise TransportError(f"{len(pending) - sent} check-in(s) not acknowledged by the broker: they stay queued (--send-queued)")
    return sent
