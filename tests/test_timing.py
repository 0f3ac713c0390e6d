"""food101.timing.QuietLock: timings run alone; heavy untimed work runs together, never beside one."""

from __future__ import annotations

import threading

import pytest

from food101.timing import QuietLock

WAIT = 0.5  # long enough for a thread that is free to go; these tests never assert on durations


def _start(target) -> tuple[threading.Thread, threading.Event]:
    """Run `target(entered)` in a thread; `entered` is set once it is inside its block."""
    entered = threading.Event()
    thread = threading.Thread(target=target, args=(entered,), daemon=True)
    thread.start()
    return thread, entered


def _until(condition, limit_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail (instead of hanging) after `limit_s`."""
    stop = threading.Event()
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return
        stop.wait(0.01)
    raise AssertionError(f"still not true after {limit_s} s")


def _hold(block, release: threading.Event):
    def run(entered: threading.Event) -> None:
        with block():
            entered.set()
            release.wait()
    return run


def test_heavy_blocks_run_together_and_a_timing_waits_for_them():
    lock = QuietLock()
    release = threading.Event()
    heavy = [_start(_hold(lock.heavy, release)) for _ in range(2)]
    assert all(entered.wait(WAIT) for _, entered in heavy)
    assert lock.state() == (2, False, 0)
    timing, timing_entered = _start(_hold(lock.timing, threading.Event()))
    assert not timing_entered.wait(WAIT)
    assert lock.state() == (2, False, 1)
    release.set()
    assert timing_entered.wait(WAIT)
    assert lock.state() == (0, True, 0)


def test_a_waiting_timing_goes_before_heavy_work_that_arrives_after_it():
    """Otherwise a stream of exports could keep an evaluation from ever timing."""
    lock = QuietLock()
    release_first, release_timing = threading.Event(), threading.Event()
    first, first_entered = _start(_hold(lock.heavy, release_first))
    assert first_entered.wait(WAIT)
    timing, timing_entered = _start(_hold(lock.timing, release_timing))
    _until(lambda: lock.state()[2] == 1)  # the timing waits
    late, late_entered = _start(_hold(lock.heavy, threading.Event()))
    assert not late_entered.wait(WAIT)  # it would run beside the timing that follows
    release_first.set()
    assert timing_entered.wait(WAIT) and not late_entered.is_set()
    release_timing.set()
    assert late_entered.wait(WAIT)


def test_timings_run_one_at_a_time_and_the_lock_is_free_after_an_error():
    lock = QuietLock()
    release = threading.Event()
    first, first_entered = _start(_hold(lock.timing, release))
    assert first_entered.wait(WAIT)
    second, second_entered = _start(_hold(lock.timing, threading.Event()))
    assert not second_entered.wait(WAIT)
    release.set()
    assert second_entered.wait(WAIT)

    other = QuietLock()
    try:
        with other.heavy():
            raise RuntimeError("a failed export")
    except RuntimeError:
        pass
    assert other.state() == (0, False, 0)


def test_heavy_blocks_nest_in_one_thread_and_a_timing_inside_one_is_refused():
    """A nested heavy block must not wait behind a timing that waits for its own outer block."""
    lock = QuietLock()
    release = threading.Event()
    outer_inside, inner_done = threading.Event(), threading.Event()

    def nested(entered: threading.Event) -> None:
        with lock.heavy():
            outer_inside.set()
            release.wait()
            with lock.heavy():
                inner_done.set()
        entered.set()

    thread, finished = _start(nested)
    assert outer_inside.wait(WAIT)
    timing, timing_entered = _start(_hold(lock.timing, threading.Event()))
    _until(lambda: lock.state()[2] == 1)  # the timing waits
    release.set()
    assert inner_done.wait(WAIT) and finished.wait(WAIT)  # the inner block did not wait
    assert timing_entered.wait(WAIT)
    other = QuietLock()
    with other.heavy(), pytest.raises(RuntimeError, match="its own thread"), other.timing():
        raise AssertionError("a timing inside a heavy block ran")
    assert other.state() == (0, False, 0)


def test_a_task_sent_to_another_process_takes_that_process_lock():
    """Found: under Dask's task runner the flow failed ("cannot pickle '_thread.RLock' object"):
    Dask sends evaluate by value with the globals it names, and it names QUIET."""
    import cloudpickle

    from food101.timing import QUIET

    def stage() -> QuietLock:  # a function that names the lock, as evaluate and robustness do
        return QUIET

    assert cloudpickle.loads(cloudpickle.dumps(stage))() is QUIET
    assert cloudpickle.loads(cloudpickle.dumps(QUIET)) is QUIET
