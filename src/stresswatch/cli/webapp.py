"""``stresswatch worker-app``: serve the support workers' web page."""

from __future__ import annotations

from pathlib import Path

import click

from ..alerts.topics import Topics
from ..errors import ConfigError
from ..webapp import require_web
from ._common import AppContext, console_err, pass_app

EPILOG = """
\b
Examples:
  stresswatch worker-app --broker mqtt://127.0.0.1:1883              # then open http://127.0.0.1:8080
  stresswatch worker-app --broker mqtts://broker.example:8883 --host 0.0.0.0 --port 8443 \\
      --tls-cert web.crt --tls-key web.key
"""


@click.command("worker-app", epilog=EPILOG)
@click.option("--broker", metavar="URL", help="The engine's broker, mqtt://HOST:PORT (default: mqtt.url from settings).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen on this address (0.0.0.0: every interface; use TLS then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Serve HTTPS with this certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="... and this private key (PEM).")
@pass_app
def worker_app(app: AppContext, broker: str | None, host: str, port: int, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Serve the support workers' web app: live alerts, acknowledge, resolve, history.

    Each worker signs in with their own broker account; the server connects to the broker as
    that worker, so the broker decides what each one sees. Off loopback, serve it over TLS
    (--tls-cert/--tls-key): passwords and session cookies cross the network.
    """
    require_web()
    import uvicorn

    from ..webapp.app import WebSettings, create_app

    s = app.settings
    url = broker or s.mqtt.url
    if not url:
        raise ConfigError("no broker: pass --broker or set mqtt.url", field="mqtt.url")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", field="--tls-key")
    tls = tls_cert is not None
    if not tls and host not in ("127.0.0.1", "localhost", "::1"):
        console_err.print(f"warning: serving on {host} without TLS: passwords cross the network in clear (pass --tls-cert/--tls-key)")
    web = WebSettings(broker_url=url, state_dir=s.store.state_dir, topics=Topics(s.mqtt.prefix), protocol=s.mqtt.protocol, tls=tls)
    scheme = "https" if tls else "http"
    console_err.print(f"worker app on {scheme}://{host}:{port} (broker {url.split('@')[-1].split('?')[0]}); Ctrl-C to stop")
    uvicorn.run(
        create_app(web),
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
