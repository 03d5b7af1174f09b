"""Admission counting and the per-user token bucket."""

from __future__ import annotations

from gateway import config
from gateway.limits import Admission, RateLimiter


def settings(**overrides):
    return config.from_mapping({"limits": overrides}).limits


def test_admission_caps_and_release():
    adm = Admission(
        settings(max_connections=3, max_connections_per_address=2, max_unauthenticated=2)
    )
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") == "max_unauthenticated"
    adm.authenticated()
    assert adm.admit("10.0.0.1") == "max_connections_per_address"
    assert adm.admit("10.0.0.2") is None
    assert adm.admit("10.0.0.3") == "max_connections"
    adm.release("10.0.0.1", authenticated=True)
    adm.release("10.0.0.1", authenticated=False)
    adm.release("10.0.0.2", authenticated=False)
    assert (adm.total, adm.unauthenticated, dict(adm.per_address)) == (0, 0, {})


def test_token_bucket_allows_bursts_then_paces():
    limiter = RateLimiter(per_minute=60)
    assert all(limiter.take("alice", now=100.0) == 0 for _ in range(60))  # a burst of 60
    wait = limiter.take("alice", now=100.0)
    assert 0.9 < wait <= 1.0  # one token per second afterwards
    assert limiter.take("alice", now=101.0) == 0
    assert limiter.take("bob", now=101.0) == 0  # buckets are per user
