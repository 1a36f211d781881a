"""``stresswatch broker``: the project's Mosquitto broker (configuration and accounts).

``broker config`` writes a directory that ``mosquitto -c DIR/mosquitto.conf`` runs;
``broker add-user|add-worker|add-engine`` provision accounts in it. docs/BROKER.md explains
the access rules and the measured reasons behind the limits.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from ..broker import DEFAULT_ENGINE_ID, BrokerDir, Role, TlsListener, is_loopback_host
from ..config import MqttSettings
from ..errors import ConfigError
from ._common import AppContext, pass_app

EPILOG = """
\b
Examples:
  stresswatch broker config --out /etc/stresswatch/broker
  stresswatch broker config --out broker/ --host 0.0.0.0 --no-plaintext \\
      --tls-cert server.crt --tls-key server.key --tls-ca ca.crt --tls-port 8883
  stresswatch broker add-engine --dir broker/
  stresswatch broker add-worker sam --dir broker/
  stresswatch broker add-user alice --dir broker/ --password-file alice.pw
  stresswatch broker list --dir broker/
  stresswatch broker check --conf broker/mosquitto.conf --broker mqtt://10.0.0.5:1883 --live
  mosquitto -c broker/mosquitto.conf
"""

_dir_option = click.option(
    "--dir",
    "broker_dir",
    required=True,
    envvar="STRESSWATCH_BROKER_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="The directory `broker config --out` wrote (env STRESSWATCH_BROKER_DIR).",
)
_password_option = click.option(
    "--password-file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Read the password from the first line of this file ('-': stdin) instead of generating one.",
)
_replace_option = click.option("--replace", is_flag=True, help="Set a new password for an existing account of this role.")


@click.group(epilog=EPILOG)
def broker() -> None:
    """Configure the project's Mosquitto broker and provision its accounts."""


@broker.command(epilog=EPILOG)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
@click.option("--port", type=click.IntRange(1, 65535), default=1883, show_default=True, help="Plaintext listener port.")
@click.option(
    "--ingest-port", type=click.IntRange(1, 65535), help="The ingest broker's plaintext port (default: --port + 1)."
)
@click.option("--ingest-tls-port", type=click.IntRange(1, 65535), help="The ingest broker's TLS port (default: --tls-port + 1).")
@click.option(
    "--single-broker",
    is_flag=True,
    help="No separate ingest broker: one broker for everything, saving after every change (~300 messages/s).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the listeners bind to.")
@click.option("--no-plaintext", is_flag=True, help="Only the TLS listener (needs --tls-*).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="Server private key (PEM).")
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), help="CA certificate(s) (PEM).")
@click.option("--tls-port", type=click.IntRange(1, 65535), default=8883, show_default=True, help="TLS listener port.")
@click.option("--prefix", help="Topic prefix (default: mqtt.prefix from settings).")
@click.option(
    "--run-as",
    default=getpass.getuser(),
    show_default="the current user",
    help="System user mosquitto runs as after start (it must read these files).",
)
@pass_app
def config(
    app: AppContext,
    out: Path,
    port: int,
    ingest_port: int | None,
    ingest_tls_port: int | None,
    single_broker: bool,
    host: str,
    no_plaintext: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    tls_port: int,
    prefix: str | None,
    run_as: str,
) -> None:
    """Write two brokers' files: OUT/mosquitto.conf (alerts and consent, saved after every
    change) and OUT/mosquitto-ingest.conf (ingest, saved every minute), sharing OUT/passwd
    and OUT/acl; OUT/data/ and OUT/data-ingest/ hold their stores.

    No anonymous access; a password file and an ACL of SPEC's topic table (%u patterns);
    nothing acknowledged is lost when a broker crashes (docs/BROKER.md, "Two brokers"); an
    optional TLS listener from given certificates. Rerunning it keeps the accounts.
    """
    given = [f for f in (tls_cert, tls_key, tls_ca) if f is not None]
    if given and len(given) != 3:
        raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca", field="--tls-*")
    if no_plaintext and not given:
        raise ConfigError("--no-plaintext needs a TLS listener (--tls-cert, --tls-key, --tls-ca)", field="--no-plaintext")
    if not no_plaintext and given and port == tls_port:
        raise ConfigError(f"--port and --tls-port are both {port}", field="--tls-port")
    if not host or any(c.isspace() or c == "#" for c in host):
        raise ConfigError(f"{host!r} is not an address to bind to", field="--host")
    if prefix is not None:
        try:
            MqttSettings(prefix=prefix)
        except ValidationError as exc:
            raise ConfigError(exc.errors()[0]["msg"], field="--prefix") from None
    tls = TlsListener(tls_port, tls_cert, tls_key, tls_ca, host) if tls_cert and tls_key and tls_ca else None
    d = BrokerDir(out)
    d.write_config(
        port=port,
        host=host,
        prefix=prefix or app.settings.mqtt.prefix,
        tls=tls,
        plaintext=not no_plaintext,
        run_as=run_as,
        ingest_port=ingest_port,
        ingest_tls_port=ingest_tls_port,
        ingest_broker=not single_broker,
    )
    click.echo(f"wrote {d.conf}, {d.passwd}, {d.acl} and {d.data}/", err=True)
    if not single_broker:
        click.echo(f"wrote {d.ingest_conf} and {d.ingest_data}/ (the ingest broker: set mqtt.ingest_url to it)", err=True)
    if not no_plaintext and not is_loopback_host(host):
        click.echo(
            f"warning: the plaintext listener on {host}:{port} sends passwords and alerts unencrypted; "
            "prefer TLS off loopback (--tls-*, --no-plaintext)",
            err=True,
        )
    if not d.accounts():
        click.echo(f"next: stresswatch broker add-engine --dir {out}; then add workers and users", err=True)
    click.echo(f"run: mosquitto -c {d.conf.resolve()}", err=True)
    if not single_broker:
        click.echo(f"run: mosquitto -c {d.ingest_conf.resolve()}", err=True)


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=path, field="--password-file") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError("the first line (the password) is empty", source=path, field="--password-file")
    return password


def _provision(role: Role, account_id: str, broker_dir: Path, password_file: Path | None, replace: bool) -> None:
    given = _read_password(password_file)
    password = BrokerDir(broker_dir).add(role, account_id, given, replace=replace)
    click.echo(
        f"{role.value} {account_id!r} {'updated' if replace else 'added'} in {broker_dir}; a running mosquitto "
        "picks it up on SIGHUP (kill -HUP <pid>)",
        err=True,
    )
    if given is None:
        click.echo("its password, shown only this once:", err=True)
        click.echo(password)


@broker.command("add-user", epilog=EPILOG)
@click.argument("user_id")
@_dir_option
@_password_option
@_replace_option
def add_user(user_id: str, broker_dir: Path, password_file: Path | None, replace: bool) -> None:
    """Provision service user USER_ID: writes its own ingest and consent topics, reads its status."""
    _provision(Role.USER, user_id, broker_dir, password_file, replace)


@broker.command("add-worker", epilog=EPILOG)
@click.argument("worker_id")
@_dir_option
@_password_option
@_replace_option
def add_worker(worker_id: str, broker_dir: Path, password_file: Path | None, replace: bool) -> None:
    """Provision support worker WORKER_ID: reads only its own alerts, writes only its own acks."""
    _provision(Role.WORKER, worker_id, broker_dir, password_file, replace)


@broker.command("add-engine", epilog=EPILOG)
@click.argument("engine_id", default=DEFAULT_ENGINE_ID)
@_dir_option
@_password_option
@_replace_option
def add_engine(engine_id: str, broker_dir: Path, password_file: Path | None, replace: bool) -> None:
    """Provision the engine's account (default id stresswatch-engine): the only one that
    publishes alerts and status and reads every user's ingest and consent and every ack."""
    _provision(Role.ENGINE, engine_id, broker_dir, password_file, replace)


@broker.command(epilog=EPILOG)
@click.argument("account_id")
@_dir_option
def remove(account_id: str, broker_dir: Path) -> None:
    """Remove an account (password and ACL entries); SIGHUP the broker to apply."""
    role = BrokerDir(broker_dir).remove(account_id)
    click.echo(f"{role.value} {account_id!r} removed; apply with kill -HUP <mosquitto pid>", err=True)


@broker.command("list", epilog=EPILOG)
@_dir_option
def list_(broker_dir: Path) -> None:
    """The accounts provisioned in DIR and their roles (never passwords)."""
    for account_id, role in BrokerDir(broker_dir).accounts().items():
        click.echo(f"{role.value:7} {account_id}")


@broker.command(epilog=EPILOG)
@click.option("--conf", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="The broker's mosquitto.conf.")
@click.option("--broker", "url", metavar="URL", help="The URL the engine uses (default: mqtt.url).")
@click.option("--live", is_flag=True, help="Also connect without credentials: an open broker off loopback is refused.")
@pass_app
def check(app: AppContext, conf: Path | None, url: str | None, live: bool) -> None:
    """The checks the engine runs before it starts: no anonymous access off loopback."""
    from ..broker import check_broker_refuses_anonymous, check_broker_security

    m = app.settings.mqtt
    url = url or m.url
    if url is None and conf is None:
        raise ConfigError("nothing to check: pass --conf and/or --broker (or set mqtt.url)", field="mqtt.url")
    check_broker_security(url or "mqtt://127.0.0.1", m.username, conf=conf)
    if live and url:
        check_broker_refuses_anonymous(url)
    checked = " and ".join(x for x in (str(conf) if conf else "", url or "") if x)
    click.echo(f"ok: {checked}: no anonymous access off loopback")
