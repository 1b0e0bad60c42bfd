"""A hypothesis state machine that interleaves maps, user errors, worker deaths and
timeouts on one long-lived pool: every call that succeeds returns exactly
``list(map(f, xs))``, every failure is the documented error, and the pool stays usable."""

from __future__ import annotations

import os
import signal
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from twat_mp import ProcessPool, TaskTimeoutError, WorkerCrashedError


def plus_one(x):
    return x + 1


def raise_on_negative(x):
    if x < 0:
        raise ValueError(x)
    return x * 3


def kill_on_seven(x):
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def hang_on_seven(x):
    if x == 7:
        time.sleep(30)
    return x


ints = st.lists(st.integers(min_value=-5, max_value=20), max_size=30)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = ProcessPool(nodes=2)._open()
        self.calls = 0

    @rule(xs=ints, how=st.sampled_from(["map", "imap", "uimap", "amap"]))
    def successful_map(self, xs, how):
        expected = list(map(plus_one, xs))
        if how == "map":
            assert self.pool.map(plus_one, xs) == expected
        elif how == "imap":
            assert list(self.pool.imap(plus_one, iter(xs))) == expected
        elif how == "uimap":
            assert sorted(self.pool.uimap(plus_one, xs)) == sorted(expected)
        else:
            assert self.pool.amap(plus_one, xs).get(timeout=20) == expected
        self.calls += 1

    @rule(xs=ints)
    def user_error(self, xs):
        if any(x < 0 for x in xs):
            with pytest.raises(ValueError) as info:
                self.pool.map(raise_on_negative, xs)
            assert info.value.__cause__.input_item == next(x for x in xs if x < 0)
        else:
            assert self.pool.map(raise_on_negative, xs) == [x * 3 for x in xs]

    @rule(xs=ints, retries=st.integers(min_value=0, max_value=1))
    def worker_death(self, xs, retries):
        if 7 in xs:
            with pytest.raises(WorkerCrashedError) as info:
                self.pool.map(kill_on_seven, xs, retries=retries)
            assert 7 in info.value.items
        else:
            assert self.pool.map(kill_on_seven, xs, retries=retries) == xs

    @precondition(lambda self: self.calls % 3 == 0)
    @rule()
    def timeout(self):
        with pytest.raises(TaskTimeoutError) as info:
            self.pool.map(hang_on_seven, [1, 7, 2], timeout=0.3)
        assert info.value.items == [7]
        self.calls += 1

    @invariant()
    def pool_is_usable(self):
        assert self.pool.alive

    def teardown(self) -> None:
        self.pool.terminate()
        self.pool.join()


PoolMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_pool_state_machine = pytest.mark.timeout(240)(PoolMachine.TestCase)
