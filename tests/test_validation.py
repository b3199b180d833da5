"""perceivers.validation: the NaN/Inf check's settings across threads."""

from __future__ import annotations

import threading

import pytest
import torch

from perceivers.validation import check_finite, finite_checks, finite_checks_enabled, set_finite_checks

BAD = torch.tensor([1.0, float("nan")])


def test_finite_checks_blocks_are_per_thread() -> None:
    """Two threads whose ``finite_checks(False)`` blocks overlap (entered A, B; left A, B) used to restore each
    other's saved global, leaving the checks off for the whole process; a block now changes its thread only."""
    entered, left_a = threading.Barrier(2), threading.Event()
    seen = {}

    def thread_a() -> None:
        with finite_checks(False):
            entered.wait()
        left_a.set()

    def thread_b() -> None:
        with finite_checks(False):
            entered.wait()
            left_a.wait()
            check_finite(BAD, "x")  # still off in this thread's block
        seen["b_after"] = finite_checks_enabled()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"b_after": True}
    assert finite_checks_enabled()
    with pytest.raises(ValueError, match="must be finite"):
        check_finite(BAD, "x")


def test_a_block_in_one_thread_leaves_the_others_checking() -> None:
    inside, done = threading.Event(), threading.Event()

    def off() -> None:
        with finite_checks(False):
            inside.set()
            done.wait()

    t = threading.Thread(target=off)
    t.start()
    inside.wait()
    try:
        with pytest.raises(ValueError, match="must be finite"):
            check_finite(BAD, "x")
    finally:
        done.set()
        t.join()


def test_the_process_wide_setting_and_nested_blocks() -> None:
    previous = set_finite_checks(False)
    try:
        check_finite(BAD, "x")  # off everywhere
        seen = []
        t = threading.Thread(target=lambda: seen.append(finite_checks_enabled()))
        t.start()
        t.join()
        assert seen == [False]
        with finite_checks(True):  # a block overrides it in its thread
            with pytest.raises(ValueError, match="must be finite"):
                check_finite(BAD, "x")
            with finite_checks(False):
                check_finite(BAD, "x")
            assert finite_checks_enabled()
        assert not finite_checks_enabled()
    finally:
        set_finite_checks(previous)
    assert finite_checks_enabled()
