"""The support worker's client: subscribes to its own alerts topic and hands each alert,
once per ``alert_id``, to a callback (the CLI prints it)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from ..errors import TransportError
from ..model import Alert
from .topics import Topics
from .transport import connect


class WorkerClient:
    """A persistent MQTT session, so alerts sent while the worker was away arrive on return."""

    def __init__(
        self,
        url: str,
        worker: str,
        on_alert: Callable[[Alert], None],
        *,
        topics: Topics | None = None,
        username: str | None = None,
        password: str | None = None,
        protocol: str = "auto",
        on_invalid: Callable[[str, str], None] | None = None,
    ) -> None:
        self.worker = worker
        self.topic = (topics or Topics()).alerts(worker)
        self._on_alert = on_alert
        self._on_invalid = on_invalid
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.received: list[Alert] = []
        self._client = connect(
            url,
            f"stresswatch-worker-{worker}",
            username=username,
            password=password,
            protocol=protocol,
            persistent_session=True,
            on_message=self._message,
        )
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.subscribe(self.topic, qos=1)
        if not subscribed.wait(10):
            self.close()
            raise TransportError(f"no SUBACK for {self.topic!r}", url=url)

    def _message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            alert = Alert.model_validate(json.loads(msg.payload))
        except (ValueError, ValidationError) as exc:
            if self._on_invalid:
                self._on_invalid(msg.topic, str(exc).splitlines()[0])
            return
        with self._lock:
            if alert.alert_id in self._seen:
                return  # at-least-once delivery: a re-send keeps its id
            self._seen.add(alert.alert_id)
            self.received.append(alert)
        self._on_alert(alert)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
