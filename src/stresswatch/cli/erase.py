"""``stresswatch erase``: the right to erasure."""

from __future__ import annotations

import click

from ..alerts.outbox import Outbox
from ..alerts.topics import Topics
from ..alerts.transport import BrokerAddress, MqttTransport
from ..consent.ledger import ConsentLedger
from ..consent.rights import erase_stores
from ..clock import utc_now
from ..errors import TransportError
from ..store import SampleStore
from ._common import AppContext, console, console_err, id_option, pass_app, without_credentials

EXIT_BROKER_PART_FAILED = 75  # EX_TEMPFAIL: local data erased; run again to clear the broker's copy

EPILOG = f"""
\b
Exit status:
  0   everything local erased (and, with a broker, the consent topic cleared)
  {EXIT_BROKER_PART_FAILED}  everything local erased, but the broker part failed (unreachable,
      wrong password, not authorised): the line printed says why; run the same
      command again when it is fixed
  65  the user id is not valid (nothing touched)

\b
Examples:
  stresswatch erase --user alice
  stresswatch erase --user alice --yes --broker mqtt://alice:PASSWORD@127.0.0.1:1883
"""


@click.command(epilog=EPILOG)
@click.option("--user", required=True, callback=id_option("user"), help="Whose data to erase.")
@click.option("--broker", metavar="URL", help="Also clear the user's retained consent topic here (default: mqtt.url), with the user's own account.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def erase(app: AppContext, user: str, broker: str | None, yes: bool) -> None:
    """Erase a user's data from every local store (consent ledger rows, alert history,
    samples, detector state), then, with a broker, clear the user's retained consent topic.

    Local data is erased whatever the broker says. The user's account may write only its
    own consent topic; the engine, seeing it cleared, erases its own copy and clears the
    user's status topic (which only the engine may write). Keep an export first if you want
    one: this cannot be undone."""
    if not yes:
        click.confirm(f"Erase all data of {user!r}? This cannot be undone", abort=True)
    s = app.settings
    with ConsentLedger(s.store.db_path) as ledger, Outbox(s.store.db_path) as outbox:
        removed = erase_stores(user, ledger=ledger, outbox=outbox, store=SampleStore(s.store.state_dir), now=utc_now(), detector_settings=s.detector)
    console.print(
        f"erased {user} locally: {removed['consent_events']} consent event(s), {removed['alerts']} alert row(s), "
        f"{removed['samples']:,} sample(s), detector state {'removed' if removed['detector_state'] else 'none'}"
    )
    url = broker or s.mqtt.url
    if not url:
        console_err.print("no broker configured: the retained consent topic was not cleared (pass --broker)")
        return
    topic = Topics(s.mqtt.prefix).consent(user)
    try:
        where = str(BrokerAddress.parse(url))
        t = MqttTransport(url, client_id=f"stresswatch-erase-{user}", username=s.mqtt.username, password=s.mqtt.password, protocol=s.mqtt.protocol)
        try:
            t.publish(topic, b"", qos=1, retain=True)
        finally:
            t.close()  # waits for the PUBACK; an MQTT 5 refusal raises here
    except TransportError as exc:
        why = without_credentials(_why(exc, user), url)
        raise BrokerPartFailed(f"erased locally, but the consent topic {topic} was not cleared: {why}; run the same command again when that is fixed") from None
    console.print(
        f"broker {where}: cleared the retained {topic}; a running engine now erases its copy and clears "
        f"{Topics(s.mqtt.prefix).status(user)}",
        markup=False,
    )


class BrokerPartFailed(TransportError):
    """Local data erased; the broker refused or could not be reached."""

    exit_code = EXIT_BROKER_PART_FAILED


def _why(exc: TransportError, user: str) -> str:
    text = str(exc)
    if "not authori" in text.lower():
        return f"not authorised ({text}): use {user}'s own account, mqtt://{user}:PASSWORD@HOST:PORT (docs/BROKER.md)"
    return text
