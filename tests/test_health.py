"""Readiness: started, owning partitions, the store answering and the loop turning."""

from __future__ import annotations

from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics


def test_ready_only_when_started_assigned_answering_and_turning() -> None:
    now = [0.0]
    metrics = Metrics()
    health = Health(30.0, ready_gauge=metrics.ready, clock=lambda: now[0])

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("embedstream_ready")

    assert health.ready() == (False, "starting") and gauge() == 0
    health.set_partitions(0)
    health.started()
    ok, why = health.ready()
    assert not ok and "no partitions assigned" in why and gauge() == 0
    health.set_partitions(2)
    assert health.ready() == (True, "ok") and gauge() == 1
    health.set_ready("store unavailable: timed out")
    assert health.ready() == (False, "store unavailable: timed out") and gauge() == 0
    health.set_ready(None)
    assert health.ready() == (True, "ok")
    now[0] = 45.0  # the loop has not turned for longer than the liveness timeout
    ok, why = health.ready()
    assert not ok and why.startswith("stalled") and not health.live()[0]
    health.beat()
    assert health.ready() == (True, "ok")
    health.set_partitions(0)  # e.g. all revoked to another replica
    assert not health.ready()[0] and gauge() == 0
