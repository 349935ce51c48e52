"""The connection cap under RLIMIT_NOFILE: what a worker may hold and what it keeps back."""

from __future__ import annotations

import resource

import pytest

from minismtp.descriptors import (
    MIN_DELIVERY_RESERVE, WORKER_OWN_FDS, connection_cap, descriptors_wanted,
)


def test_under_the_common_1024_limit_a_quarter_is_kept_for_message_files():
    usable = 1024 - WORKER_OWN_FDS - 1
    assert connection_cap(1024, listeners=1, configured=4096) == usable - usable // 4


def test_a_small_limit_still_keeps_the_minimum_reserve():
    usable = 64 - WORKER_OWN_FDS - 1
    assert connection_cap(64, listeners=1, configured=4096) == usable - MIN_DELIVERY_RESERVE


def test_a_generous_limit_leaves_the_configured_value():
    assert connection_cap(1 << 20, listeners=2, configured=4096) == 4096
    assert connection_cap(resource.RLIM_INFINITY, listeners=2, configured=4096) == 4096


def test_never_below_one():
    assert connection_cap(8, listeners=4, configured=100) == 1


@pytest.mark.parametrize("configured", [1, 10, 100, 1000, 4096, 100_000])
@pytest.mark.parametrize("listeners", [1, 3, 64])
def test_the_wanted_limit_keeps_the_configured_value_whole(configured, listeners):
    wanted = descriptors_wanted(configured, listeners)
    assert connection_cap(wanted, listeners, configured) == configured
    assert connection_cap(wanted - 1, listeners, configured) <= configured
