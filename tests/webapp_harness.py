"""The worker app served by a real uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stresswatch.broker import free_port


@contextmanager
def serving(broker_url: str, state_dir: Path, *, tls: tuple[Path, Path] | None = None, **settings: object) -> Iterator[str]:
    """The app's base URL; ``tls``: (certificate, key) to serve HTTPS."""
    import uvicorn

    from stresswatch.webapp.app import WebSettings, create_app

    port = free_port()
    app = create_app(WebSettings(broker_url=broker_url, state_dir=state_dir, reply_timeout_s=5.0, tls=tls is not None, **settings))  # type: ignore[arg-type]
    ssl = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1, **ssl))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
