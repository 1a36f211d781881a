"""Cluster mode: users partitioned over engine processes on NATS JetStream (docs/CLUSTER.md).

Pure parts (no I/O): :mod:`.layout` (names, the partition of a user), :mod:`.lease` (who
takes, keeps or releases which partition), :mod:`.snapshot` (a partition's state as bytes).
I/O: :mod:`.jetstream` (nats-py on its own thread, blocking calls for the engine thread),
:mod:`.engine` (the partitioned engine), :mod:`.bridge` (Mosquitto -> JetStream),
:mod:`.status` (``stresswatch cluster status``). nats-py is the ``[cluster]`` extra.
"""
