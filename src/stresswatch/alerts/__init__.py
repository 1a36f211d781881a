"""Alert delivery: topics, the transport seam (MQTT / memory), and the worker client."""

from .topics import Topics
from .transport import MemoryTransport, MqttTransport, Transport
from .worker import WorkerClient

__all__ = ["MemoryTransport", "MqttTransport", "Topics", "Transport", "WorkerClient"]
