"""The Lease election's decisions without a cluster: a connection error is one failed attempt,
and a standby measures another holder's Lease on its own clock, never against the renewTime
written by another node. The same on the real node: tests/e2e/test_standby_e2e.py."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from beam_operator import leader

PATH = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"


class LeaseApi:
    """The requests the election makes (kubeclient.KubeApi.request), on one in-memory Lease, with
    the API's answers: 404 for a missing Lease, 409 for a create that finds one or a replace
    with a stale resourceVersion."""

    def __init__(self) -> None:
        self.lease: dict | None = None
        self.version = 0
        self.down = False
        self.requests: list[str] = []

    async def request(self, method, path, *, body=None, ok=(), fenced=True):
        assert not fenced or method == "GET", "the election's own writes are not fenced by the lease"
        await asyncio.sleep(0)  # the network: another replica's request may come first
        self.requests.append(method)
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        if method == "GET":
            assert path == f"{PATH}/l"
            return (404, None) if self.lease is None else (200, copy.deepcopy(self.lease))
        if method == "POST":
            assert path == PATH
            if self.lease is not None:
                return 409, None
            return 201, self._store(body)
        assert method == "PUT" and path == f"{PATH}/l"
        if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            return 409, None
        return 200, self._store(body)

    def _store(self, body: dict) -> dict:
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return self.lease

    def renew_by(self, holder: str, renew_time: datetime) -> None:
        self.version += 1
        self.lease = {
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": str(self.version)},
            "spec": {"holderIdentity": holder, "renewTime": renew_time.isoformat(), "leaseDurationSeconds": 15},
        }


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(leader.time, "monotonic", lambda: now.t)
    return now


class Replica:
    """One replica's election against the shared LeaseApi."""

    def __init__(self, api: LeaseApi, me: str) -> None:
        self.api = api
        self.lease = leader.Lease("ns", "l", lambda: api, me=me)

    def try_acquire(self) -> bool:
        return asyncio.run(self.lease._try_acquire(self.api))


def test_a_refused_connection_is_a_failed_attempt_not_an_exception(clock):
    api = LeaseApi()
    a = Replica(api, "a")
    api.down = True
    assert a.try_acquire() is False  # it must not end the renewal thread
    api.down = False
    assert a.try_acquire() is True and a.lease.renewed == clock.t
    assert api.lease["spec"]["holderIdentity"] == "a" and api.lease["spec"]["leaseTransitions"] == 0


def test_a_standby_takes_a_lease_only_after_it_went_unchanged_for_its_duration_on_its_own_clock(clock):
    api = LeaseApi()
    b = Replica(api, "b")
    # The holder's node clock is an hour behind: its renewTime looks long expired to b's wall
    # clock, yet it renews. b must not take it.
    api.renew_by("a", datetime.now(UTC) - timedelta(hours=1))
    assert b.try_acquire() is False
    for _ in range(10):
        clock.t += 5
        api.renew_by("a", datetime.now(UTC) - timedelta(hours=1))
        assert b.try_acquire() is False
    # The holder stops renewing: b takes the Lease once 15 s passed since it last saw a change.
    clock.t += 15
    assert b.try_acquire() is False
    clock.t += 0.5
    assert b.try_acquire() is True and api.lease["spec"]["holderIdentity"] == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1


def test_the_leader_counts_its_lease_from_when_it_sent_the_renewal(clock, monkeypatch):
    api = LeaseApi()
    a = Replica(api, "a")
    monkeypatch.setattr(leader, "_held", a.lease)
    assert a.try_acquire() and leader.still_leader()
    clock.t += leader.LEASE_S - leader.RENEW_S - 0.1
    assert leader.still_leader()
    clock.t += 0.2
    assert not leader.still_leader()  # writes stop here, before the lease could be another's


def test_of_two_standbys_racing_for_a_released_lease_only_one_wins(clock):
    api = LeaseApi()
    api.renew_by("", datetime.now(UTC))  # released: no holder
    a, b = Replica(api, "a"), Replica(api, "b")

    async def race():
        # Both read the same version; the second replace carries a stale resourceVersion: 409.
        return await asyncio.gather(a.lease._try_acquire(api), b.lease._try_acquire(api))

    assert sorted(asyncio.run(race())) == [False, True]
    assert api.requests == ["GET", "GET", "PUT", "PUT"]  # both replaced; the second was refused
    assert api.lease["spec"]["holderIdentity"] in ("a", "b")
