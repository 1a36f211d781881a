"""Publisher process: a share of the simulated users, multiplexed over a few MQTT connections.

User ``i`` sends its k-th batch at wall time ``t0 + k * batch_s + phase_i`` with phases spread
evenly over the interval, so the broker sees a steady rate, as from a real population. Every
send is logged (user, seq, wall time, newest sample time, samples, bytes) so the harness can
find, for each alert, the batch whose arrival completed the deciding window.
"""

from __future__ import annotations

import time
from multiprocessing.sharedctypes import Synchronized

import numpy as np

from mqttpub import RawPublisher
from users import NS, BatchMaker, Plan, Templates


def run_publisher(
    plan: Plan,
    templates: Templates,
    part: int,
    parts: int,
    connections: int,
    host: str,
    port: int,
    credentials: tuple[str, str] | None,
    stop_wall: float,
    log_path: str,
    sent: Synchronized,
    acked: Synchronized,
    lag_ms: Synchronized,
) -> None:
    users = np.arange(part, plan.n_users, parts)
    maker = BatchMaker(plan, templates, users)
    username, password = credentials or (None, None)
    conns = [RawPublisher(host, port, f"load-{plan.run_id}-{part}-{k}", username=username, password=password) for k in range(connections)]
    n_local = len(users)
    log_u, log_seq, log_wall, log_tmax, log_n, log_b = [], [], [], [], [], []
    k = 0  # next send: cycle k // n_local, local user k % n_local
    interval = plan.batch_s
    phase = (users.astype(np.float64) / plan.n_users) * interval
    worst_lag = 0.0
    while True:
        now = time.time()
        if now >= stop_wall:
            break
        while True:
            local = k % n_local
            due = plan.t0_wall + (k // n_local) * interval + phase[local]
            if due > now or due >= stop_wall:
                break
            out = maker.make(local, time.time_ns())
            if out is not None:
                topic, payload, seq, tmax, n = out
                conns[local % connections].queue(topic, payload)
                log_u.append(int(users[local]))
                log_seq.append(seq)
                log_wall.append(time.time_ns())
                log_tmax.append(tmax)
                log_n.append(n)
                log_b.append(len(payload))
            worst_lag = max(worst_lag, now - due)
            k += 1
        for c in conns:
            c.flush()
        sent.value = sum(c.sent for c in conns)
        acked.value = sum(c.acked for c in conns)
        lag_ms.value = int(worst_lag * 1000)
        nxt = plan.t0_wall + (k // n_local) * interval + phase[k % n_local]
        time.sleep(min(0.05, max(0.0, nxt - time.time())))
    for c in conns:
        c.flush()
        c.wait_acks(30)
    sent.value = sum(c.sent for c in conns)
    acked.value = sum(c.acked for c in conns)
    for c in conns:
        c.close()
    np.savez(
        log_path,
        user=np.array(log_u, np.int64),
        seq=np.array(log_seq, np.int64),
        wall_ns=np.array(log_wall, np.int64),
        tmax_ns=np.array(log_tmax, np.int64),
        samples=np.array(log_n, np.int64),
        bytes=np.array(log_b, np.int64),
    )


__all__ = ["NS", "run_publisher"]
