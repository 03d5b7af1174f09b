"""Admission counting and the per-user token bucket."""

from __future__ import annotations

from gateway import config
from gateway.ssh.limits import Admission, RateLimiter


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


def test_regression_a_rate_limiter_keyed_by_clients_stays_bounded_and_fast():
    """Banner budgets are per source address, which clients choose: memory stays bounded and
    a flood of new addresses costs O(1) each (no rebuild of the whole table per address)."""
    limiter = RateLimiter(per_minute=2, max_keys=1000)
    for i in range(50_000):
        limiter.take(f"2001:db8::{i:x}", now=0.0)
    assert len(limiter._buckets) <= 1000
    # A busy key keeps its (spent) budget while newcomers push old ones out.
    assert limiter.take("busy", now=1.0) == 0 and limiter.take("busy", now=1.0) == 0
    assert limiter.take("busy", now=1.0) > 0
    for i in range(500):
        limiter.take(f"new{i}", now=1.0)
    assert limiter.take("busy", now=1.0) > 0


def test_ipv6_clients_share_a_banner_budget_per_64():
    from gateway.ssh.explain import _source

    assert _source("2001:db8:1:2::1") == _source("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert _source("::ffff:192.0.2.7") == "192.0.2.7" and _source("192.0.2.7") == "192.0.2.7"
