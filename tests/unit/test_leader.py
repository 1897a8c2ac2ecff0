"""The Lease election's decisions without a cluster: a connection error is one failed attempt,
and a standby measures another holder's Lease on its own clock, never against the renewTime
written by another node. The same on the real node: tests/e2e/test_standby_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from kubernetes import client
from urllib3.exceptions import MaxRetryError

from beam_operator import leader


class LeaseApi:
    """The CoordinationV1Api calls the election makes, on one in-memory Lease."""

    def __init__(self) -> None:
        self.lease: client.V1Lease | None = None
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise MaxRetryError(None, "/apis/coordination.k8s.io", "Connection refused")

    def read_namespaced_lease(self, name, namespace):
        self._check()
        if self.lease is None:
            raise client.ApiException(status=404)
        return self.lease

    def create_namespaced_lease(self, namespace, body):
        self._check()
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = body

    def replace_namespaced_lease(self, name, namespace, body):
        self._check()
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = body

    def renew_by(self, holder: str, renew_time: datetime) -> None:
        self.version += 1
        self.lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name="l", namespace="ns", resource_version=str(self.version)),
            spec=client.V1LeaseSpec(holder_identity=holder, renew_time=renew_time, lease_duration_seconds=15),
        )


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(leader.time, "monotonic", lambda: now.t)
    return now


def _replica(api: LeaseApi, me: str) -> leader.Lease:
    lease = leader.Lease.__new__(leader.Lease)
    lease.namespace, lease.name, lease.me = "ns", "l", me
    lease.api, lease.client = api, client
    lease.renewed, lease._observed, lease._observed_at = 0.0, None, 0.0
    return lease


def test_a_refused_connection_is_a_failed_attempt_not_an_exception(clock):
    api = LeaseApi()
    a = _replica(api, "a")
    api.down = True
    assert a._try_acquire() is False  # before: MaxRetryError ended the renewal thread
    api.down = False
    assert a._try_acquire() is True and a.renewed == clock.t


def test_a_standby_takes_a_lease_only_after_it_went_unchanged_for_its_duration_on_its_own_clock(clock):
    api = LeaseApi()
    b = _replica(api, "b")
    # The holder's node clock is an hour behind: its renewTime looks long expired to b's wall
    # clock, yet it renews. b must not take it.
    api.renew_by("a", datetime.now(UTC) - timedelta(hours=1))
    assert b._try_acquire() is False
    for _ in range(10):
        clock.t += 5
        api.renew_by("a", datetime.now(UTC) - timedelta(hours=1))
        assert b._try_acquire() is False
    # The holder stops renewing: b takes the Lease once 15 s passed since it last saw a change.
    clock.t += 15
    assert b._try_acquire() is False
    clock.t += 0.5
    assert b._try_acquire() is True and api.lease.spec.holder_identity == "b"


def test_the_leader_counts_its_lease_from_when_it_sent_the_renewal(clock, monkeypatch):
    api = LeaseApi()
    a = _replica(api, "a")
    monkeypatch.setattr(leader, "_held", a)
    assert a._try_acquire() and leader.still_leader()
    clock.t += leader.LEASE_S - leader.RENEW_S - 0.1
    assert leader.still_leader()
    clock.t += 0.2
    assert not leader.still_leader()  # writes stop here, before the lease could be another's
