"""Brokers: an embedded amqtt broker for first runs, and the project's Mosquitto broker.

One job per module:

* :mod:`.embedded` - :class:`EmbeddedBroker` (amqtt, MQTT 3.1.1, own thread) and :func:`free_port`;
* :mod:`.conf` - :func:`mosquitto_conf` and :func:`render_acl` (pure text rendering);
* :mod:`.accounts` - ids, roles, ``$7$`` password hashes, :func:`private_client_id`;
* :mod:`.directory` - :class:`BrokerDir`, one broker's files on disk;
* :mod:`.security` - :func:`check_broker_security` (the engine's check before it connects)
  and the live probe :func:`check_broker_refuses_anonymous`.

Only the CLI and the engine's start-up import this package (docs/ARCHITECTURE.md).
"""

from .accounts import (
    DEFAULT_ENGINE_ID,
    PBKDF2_ITERATIONS,
    Role,
    check_account_id,
    generate_password,
    hash_password,
    private_client_id,
    verify_password,
)
from .conf import PACKET_OVERHEAD_BYTES, TlsListener, mosquitto_conf, render_acl
from .directory import BrokerDir
from .embedded import EmbeddedBroker, free_port
from .security import (
    ListenerFacts,
    check_broker_refuses_anonymous,
    check_broker_security,
    is_loopback_host,
    parse_mosquitto_conf,
)

__all__ = [
    "DEFAULT_ENGINE_ID",
    "PACKET_OVERHEAD_BYTES",
    "PBKDF2_ITERATIONS",
    "BrokerDir",
    "EmbeddedBroker",
    "ListenerFacts",
    "Role",
    "TlsListener",
    "check_account_id",
    "check_broker_refuses_anonymous",
    "check_broker_security",
    "free_port",
    "generate_password",
    "hash_password",
    "is_loopback_host",
    "mosquitto_conf",
    "parse_mosquitto_conf",
    "private_client_id",
    "render_acl",
    "verify_password",
]
