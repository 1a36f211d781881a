"""``stresswatch erase``: the right to erasure."""

from __future__ import annotations

import click

from ..alerts.outbox import Outbox
from ..alerts.topics import Topics
from ..alerts.transport import MqttTransport
from ..consent.ledger import ConsentLedger
from ..consent.rights import erase_stores
from ..clock import utc_now
from ..store import SampleStore
from ._common import AppContext, console, console_err, pass_app

EPILOG = """
\b
Examples:
  stresswatch erase --user alice
  stresswatch erase --user alice --yes --broker mqtt://127.0.0.1:1883
"""


@click.command(epilog=EPILOG)
@click.option("--user", required=True, help="Whose data to erase.")
@click.option("--broker", metavar="URL", help="Also clear the user's retained topics here (default: mqtt.url).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def erase(app: AppContext, user: str, broker: str | None, yes: bool) -> None:
    """Erase a user's data from every store: consent ledger rows, alert history, samples and
    detector state, and clear their retained MQTT topics (consent, status). A running engine
    erases its own copy when it sees the consent topic cleared. Keep an export first if you
    want one: this cannot be undone."""
    Topics().consent(user)  # validates the id before anything is touched
    if not yes:
        click.confirm(f"Erase all data of {user!r}? This cannot be undone", abort=True)
    s = app.settings
    url = broker or s.mqtt.url
    if url:
        # First the broker: the engine, seeing the consent topic cleared, stops and erases too.
        topics = Topics(s.mqtt.prefix)
        t = MqttTransport(url, client_id=f"stresswatch-erase-{user}", username=s.mqtt.username, password=s.mqtt.password, protocol=s.mqtt.protocol)
        try:
            for topic in (topics.consent(user), topics.status(user)):
                t.publish(topic, b"", qos=1, retain=True)
        finally:
            t.close()
    with ConsentLedger(s.store.db_path) as ledger, Outbox(s.store.db_path) as outbox:
        removed = erase_stores(user, ledger=ledger, outbox=outbox, store=SampleStore(s.store.state_dir), now=utc_now(), detector_settings=s.detector)
    console.print(
        f"erased {user}: {removed['consent_events']} consent event(s), {removed['alerts']} alert row(s), "
        f"{removed['samples']:,} sample(s), detector state {'removed' if removed['detector_state'] else 'none'}"
    )
    if not url:
        console_err.print("no broker configured: retained topics were not cleared (pass --broker)")
