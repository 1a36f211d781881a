"""The ``stresswatch`` command: one module per command group.

Errors the project raises on purpose (:class:`~stresswatch.errors.StresswatchError`) become
one line on stderr and a non-zero exit; nothing else is caught.
"""

from __future__ import annotations


import re

import click

from ..errors import StresswatchError, TransportError
from ..mqtt import CREDENTIALS_HINT
from ._common import AppContext
from .alerts import alerts
from .broker import broker
from .checkin import checkin
from .cluster import cluster
from .consent import consent
from .demo import demo
from .engine import engine
from .erase import erase
from .export import export
from .imports import import_
from .replay import replay
from .webapp import worker_app

EXAMPLES = """
\b
Examples:
  stresswatch demo
  stresswatch replay fixtures/demo_cohort.parquet --out out/
  stresswatch import fit run.fit --user alice
  stresswatch consent grant --user alice --to sam
  stresswatch alerts watch --worker sam --broker mqtt://sam:PASSWORD@127.0.0.1:1883


Broker accounts (docs/BROKER.md): give the account in the URL (mqtt://USER:PASSWORD@HOST),
or set mqtt.username with mqtt.password or mqtt.password_file (environment:
STRESSWATCH_MQTT__USERNAME, STRESSWATCH_MQTT__PASSWORD, STRESSWATCH_MQTT__PASSWORD_FILE).
"""


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="STRESSWATCH_CONFIG", help="TOML settings file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one setting, e.g. detector.window_s=120.")
@click.version_option(package_name="stresswatch")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """stresswatch: consent-gated 'reach out' alerts for peer support.

    Compares each person's heart rate and HRV with their own baseline and, only where
    they consented, prompts the support worker they chose to reach out. Never a diagnosis.
    """
    ctx.obj = AppContext(config_path, overrides)


for command in (demo, replay, consent, alerts, checkin, import_, engine, export, erase, broker, worker_app, cluster):
    cli.add_command(command)

COMMANDS_ENTRY_POINT_GROUP = "stresswatch.commands"


def _add_adapter_commands() -> None:
    """Adapters contribute their own commands (e.g. BLE `pair`) through an entry-point group,
    so the core CLI never imports an adapter by name."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_ENTRY_POINT_GROUP):
        try:
            command = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not take the CLI down
            click.echo(f"stresswatch: warning: command {ep.name!r} unavailable: {type(exc).__name__}: {exc}", err=True)
            continue
        if isinstance(command, click.Command) and ep.name not in cli.commands:
            cli.add_command(command, ep.name)


_add_adapter_commands()


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="stresswatch", standalone_mode=False)
    except StresswatchError as exc:
        message = re.sub(r"(mqtts?://)(?!USER:PASSWORD@)[^/@\s]*@", r"\1", str(exc))  # never print a URL's password (the hint's placeholder stays)
        if isinstance(exc, TransportError) and "not authori" in message.lower() and "docs/BROKER.md" not in message:
            message += f" ({CREDENTIALS_HINT})"  # a wrong or missing password: say how to give one
        for line in message.splitlines() or [""]:  # several problems: one line each
            click.echo(f"stresswatch: error: {line}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("stresswatch: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


