"""Bluetooth Heart Rate Service (0x180D) adapter: parser, timing, reconnection, recordings.

Module map (docs/BLE.md has the details):

* :mod:`.parser` - pure scalar parsers for 0x2A37 / 0x2A38 (bytes -> frozen dataclass)
* :mod:`.batch` - the vectorised parser for many notifications (numpy)
* :mod:`.timing` - per-beat timestamps from RR sequences and arrival times, without drift
* :mod:`.reconnect` - the pure reconnection state machine (state, event, now) -> (state, actions)
* :mod:`.recording` - the recording file format (JSON lines) and its reader/writer
* :mod:`.client` - the abstract client, the bleak client and the replaying fake client
* :mod:`.session` - drives a client through the state machine into samples and gaps
* :mod:`.buffer` / :mod:`.stream` - durable SQLite buffer and the MQTT ingest publisher
* :mod:`.source` - the ``ble`` Source for ``stresswatch replay``
* :mod:`.commands` - ``stresswatch pair | stream | record`` (entry point ``stresswatch.commands``)
"""
