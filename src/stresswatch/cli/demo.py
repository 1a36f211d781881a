"""``stresswatch demo``: the whole pipeline on the bundled cohort, alerts shown as they arrive."""

from __future__ import annotations

import tempfile
import threading
import time
from contextlib import ExitStack
from collections.abc import Callable
from pathlib import Path

import click
import polars as pl
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..alerts.topics import Topics
from ..alerts.transport import MqttTransport
from ..alerts.worker import WorkerClient
from ..broker import EmbeddedBroker
from ..consent.ledger import ConsentLedger
from ..consent.state import Visibility
from ..detect import Detector
from ..alerts.dispatch import Dispatcher
from ..alerts.outbox import Outbox
from ..clock import utc_now
from ..pipeline import AlertOutcome, DataClock, Pipeline
from ..errors import StresswatchError, TransportError
from ..model import Alert
from ..replay import read_samples, time_batches
from ._common import AppContext, console, pass_app, without_credentials

WORKER = "sam"
GROUP, GROUP_MEMBERS = "team-north", ("kim", "lee")  # a group of settings [groups], unless configured
BATCH_S = 3600  # one hour of data per batch, as a companion would send it
DEMO_CONSENT = {
    # user: (recipients in order, what they may see); 'carol' has not consented: her alert
    # must be withheld. alice chose sam, then the team-north group: unacknowledged, her alert
    # escalates to each member of the group.
    "alice": ((WORKER, GROUP), Visibility.LEVEL_AND_REASONS),
    "bob": ((WORKER,), Visibility.REACH_OUT),
    "dan": ((WORKER,), Visibility.REACH_OUT),
}

EPILOG = """
\b
Examples:
  stresswatch demo                                  # embedded broker, bundled cohort
  stresswatch demo --broker mqtt://127.0.0.1:1883   # a Mosquitto you run
"""


def _fixture() -> Path:
    from importlib.resources import files

    return Path(str(files("stresswatch_fixtures").joinpath("demo_cohort.parquet")))


def _print_alert(worker: str, alert: Alert) -> None:
    detail = ""
    if alert.level is not None:
        detail = f"  level [bold]{alert.level.value}[/]"
    if alert.reasons:
        detail += "  reasons " + ", ".join(r.value for r in alert.reasons)
    if alert.notice:
        detail += "  [dim](escalated: not acknowledged in time)[/]"
    console.print(
        f"[bold magenta]worker {worker} received[/] {alert.raised_at:%a %H:%M} UTC  "
        f"[bold]reach out to {alert.user}[/]{detail}  (episode since {alert.episode_start:%H:%M})"
    )


def _print_people(windows: pl.DataFrame, alerts: pl.DataFrame) -> None:
    """What happened to each person, in words: alerts and why, moving, HR-only, calibrating."""
    table = Table(title="what happened to each person", show_header=True, header_style="bold")
    for col in ("person", "consent", "windows scored", "calibrating", "moving (not scored)", "HR only", "alerts", "why"):
        table.add_column(col, justify="left" if col in ("person", "consent", "why") else "right")
    for user in sorted(windows.get_column("user").unique().to_list()):
        w = windows.filter(pl.col("user") == user)
        a = alerts.filter(pl.col("user") == user)
        states = dict(w.group_by("state").len().iter_rows())
        scored = states.get("ok", 0) + states.get("elevated", 0)
        moving = states.get("suppressed_motion", 0)
        hr_only = w.filter(pl.col("signal") == "hr_only").height
        why = []
        for alert in a.iter_rows(named=True):
            fate = f"sent to {', '.join(alert['recipients'])}" if alert["sent"] else f"not sent: {alert['consent'].replace('_', ' ')}"
            why.append(f"alert raised {alert['raised_at']:%a %H:%M} UTC, {fate}")
        if not a.height:
            measures = "heart rate" if hr_only * 2 > w.height else "heart rate and HRV"
            why.append(f"no alert: {measures} stayed within the person's own baseline")
        if moving:
            why.append(f"moving in {moving} windows (steps reported): a raised heart rate there is exercise, so those windows are not scored and cannot alert")
        if hr_only:
            why.append(f"HR-only watch: no beat-to-beat intervals, so no HRV; {hr_only} windows scored on heart rate alone")
        table.add_row(
            user,
            "yes" if user in DEMO_CONSENT else "no",
            f"{scored:,}",
            f"{states.get('calibrating', 0):,}",
            f"{moving:,}",
            f"{hr_only:,}",
            str(a.height),
            "; ".join(why),
        )
    console.print(table)


@click.command(epilog=EPILOG)
@click.option("--broker", metavar="URL", help="Use this broker (mqtt://HOST:PORT) instead of the embedded one.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep the demo's SQLite state here (default: a temporary folder).")
@click.option("--speed", default=20000.0, show_default=True, help="Data seconds per wall-clock second (0: as fast as possible).")
@click.option("--wait-s", default=15.0, show_default=True, help="How long to wait for the worker to receive the alerts sent.")
@pass_app
def demo(app: AppContext, broker: str | None, state_dir: Path | None, speed: float, wait_s: float) -> None:
    """Run the whole pipeline on a bundled two-day cohort of four people.

    Starts an embedded MQTT broker (or uses --broker), records consent for three of the
    four people, replays their heart data through the detector, and shows the support
    worker's client receiving each alert. Ends with a summary.

    --broker must accept clients without an account (a local test Mosquitto with
    allow_anonymous): the demo plays the engine and the worker at once, which the project's
    own broker (accounts and an ACL, `stresswatch broker config`) rightly keeps apart.
    """
    try:
        _demo(app, broker, state_dir, speed, wait_s)
    except TransportError as exc:
        with_account = "@" in broker.split("//", 1)[-1].split("/", 1)[0] if broker else False
        if broker is not None and ("not authori" in str(exc).lower() or with_account):
            raise TransportError(
                f"{without_credentials(str(exc), broker)}: the demo needs a broker that accepts clients without an account, "
                "because it plays the engine and the worker at once, which a broker with accounts and an ACL keeps apart. "
                "Run `stresswatch demo` without --broker (embedded broker), or point --broker at a local Mosquitto with "
                "allow_anonymous true; to try accounts, see docs/BROKER.md"
            ) from None
        raise


def _demo(app: AppContext, broker: str | None, state_dir: Path | None, speed: float, wait_s: float) -> None:
    settings = app.settings
    if GROUP not in settings.groups:
        settings = settings.model_copy(update={"groups": {**settings.groups, GROUP: list(GROUP_MEMBERS)}})
    members = tuple(settings.groups[GROUP])
    workers = tuple(dict.fromkeys((WORKER, *members)))
    topics = Topics(settings.mqtt.prefix)
    with ExitStack() as stack:
        if broker is None:
            url, protocol = stack.enter_context(EmbeddedBroker()).url, "3.1.1"
            console.print(f"[dim]embedded MQTT broker on {url}[/]")
        else:
            url, protocol = broker, settings.mqtt.protocol
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stresswatch-demo-")))
        db_path = state_dir / "stresswatch.sqlite"
        ledger = stack.enter_context(ConsentLedger(db_path))
        outbox = stack.enter_context(Outbox(db_path))  # durable, as in the engine
        now = utc_now()
        for user, (to, visibility) in DEMO_CONSENT.items():
            st = ledger.grant(user, list(to), now=now, visibility=visibility, via="demo")
            shown = " then ".join(f"group {w} ({', '.join(settings.groups[w])})" if w in settings.groups else f"worker {w}" for w in to)
            console.print(f"[green]consent[/] {user} -> {shown}, shown as {st.display_name}, sees {visibility.value}")
        console.print("[yellow]no consent[/] carol: her alerts must be withheld")

        received = threading.Event()  # set whenever an alert arrives; the condition is checked below
        got: dict[str, list[Alert]] = {w: [] for w in workers}

        def on_alert_for(worker: str) -> Callable[[Alert], None]:
            def on_alert(alert: Alert) -> None:
                _print_alert(worker, alert)
                got[worker].append(alert)
                received.set()

            return on_alert

        for w in workers:
            client = WorkerClient(url, w, on_alert_for(w), topics=topics, protocol=protocol)
            stack.callback(client.close)
        transport = MqttTransport(url, client_id="stresswatch-demo-engine", protocol=protocol)
        stack.callback(transport.close)

        def on_outcome(o: AlertOutcome) -> None:
            if not o.sent:
                console.print(f"[yellow]withheld[/] alert for {o.decision.user} at {o.decision.raised_at:%a %H:%M} UTC: {o.verdict}")

        # The demo replays two days in seconds: its clock is the data's, so cooldown and
        # escalation act as they would have over those two days (as in a replay).
        clock = DataClock()
        dispatcher = Dispatcher.from_settings(settings, outbox, ledger, transport, clock=clock)
        pipeline = Pipeline(
            Detector(settings.detector), dispatcher, keep_alerts=True, keep_windows=True, on_alert=on_outcome, data_clock=clock
        )  # windows: for the per-person account at the end
        samples = read_samples([_fixture()])
        batches = time_batches(samples, BATCH_S)
        started = time.monotonic()
        with Progress(TextColumn("replaying"), BarColumn(), TextColumn("{task.completed}/{task.total} h"), TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("replay", total=len(batches))
            for batch in batches:
                clock.set_to_end_of(batch)
                pipeline.process(batch)
                pipeline.tick()
                bar.advance(task)
                if speed > 0:
                    time.sleep(BATCH_S / speed)
        pipeline.finish()
        report = pipeline.report
        # Every worker an alert was sent to (groups expanded) must receive it, once.
        expected = {(w, o.decision.alert_id) for o in report.sent for w in o.record.targets}
        deadline = time.monotonic() + wait_s
        while not expected <= {(w, a.alert_id) for w in workers for a in got[w]}:
            if time.monotonic() > deadline:
                missing = len(expected - {(w, a.alert_id) for w in workers for a in got[w]})
                raise TransportError(f"workers did not receive {missing} of {len(expected)} alert notice(s) within {wait_s:g} s", url=url)
            received.wait(0.1)
            received.clear()

        table = Table(title="stresswatch demo", show_header=False)
        table.add_row("people", str(len(report.users)))
        table.add_row("samples", f"{samples.height:,}")
        table.add_row("windows", f"{report.n_windows:,}")
        table.add_row("alerts raised", str(len(report.outcomes)))
        table.add_row("alerts sent", str(len(report.sent)))
        table.add_row("alerts withheld by consent", str(len(report.withheld)))
        for w in workers:
            table.add_row(f"received by worker {w}", str(len(got[w])))
        table.add_row("time", f"{time.monotonic() - started:.1f} s")
        console.print(table)
        _print_people(report.windows_frame(), report.alerts_frame())
        if not report.sent:
            raise StresswatchError("the demo raised no alert that consent allowed: the detector or fixture is broken")
