"""The crash probe's forked child: what it reports back, and that it never hangs the parent.

A forked child has only the forking thread. Found under libFuzzer (a long-lived process): the
child slept in ``futex_wait`` until the fuzzer's timeout. The stack (py-spy, gdb) showed the
child's garbage collector destroying an onnxruntime object of the parent, whose destructor
waited in ``pthread_cond_destroy`` for thread-pool threads the child does not have. A lock
held by another thread at the fork blocks the same way.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from onnxshrink import runtime
from onnxshrink.modelio import load_model
from onnxshrink.stats import count_macs

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="the probe forks (Linux/macOS)")


def _conv_model(path: Path) -> onnx.ModelProto:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.1] * 108)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return load_model(path)[0]


@contextlib.contextmanager
def _held_by_another_thread(lock: Any) -> Iterator[None]:
    """``lock`` taken by another thread of this process for as long as the block runs."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(5)
        yield
    finally:
        release.set()
        holder.join()


def test_child_reports_the_mac_count(tmp_path: Path) -> None:
    model = _conv_model(tmp_path / "m.onnx")
    probe = runtime.CrashProbe(tmp_path / "m.onnx", model)
    probe.wait()
    assert probe.mac_total == (count_macs(model).total,)
    assert probe.mac_total[0] == 4 * 3 * 9 * 64


def test_lock_held_by_another_thread_at_fork_is_free_in_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory-bound lock, held by a thread of the parent when it forks: the child's shape
    inference takes it at once (it used to hang there for good)."""
    monkeypatch.setenv("ONNXSHRINK_MAX_MEMORY", "8G")  # with no bound the lock is never taken
    model = _conv_model(tmp_path / "m.onnx")
    with _held_by_another_thread(runtime._ADDRESS_SPACE._lock):
        start = time.monotonic()
        probe = runtime.CrashProbe(tmp_path / "m.onnx", model)
        probe.wait()
        assert time.monotonic() - start < runtime._STALL_SECONDS
        assert probe.mac_total is not None  # got through the shape stage


def test_stalled_child_is_inconclusive_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any lock a parent thread holds at the fork (a C extension's, say) and the child needs:
    the parent sees a child asleep without CPU time, kills it and goes on without a verdict."""
    model = _conv_model(tmp_path / "m.onnx")
    foreign = threading.Lock()
    import onnxshrink.stats as stats

    real = stats.count_macs

    def count_macs_needing_the_lock(m: onnx.ModelProto, *args: object, **kwargs: object) -> object:
        with foreign:
            return real(m, *args, **kwargs)

    monkeypatch.setattr(stats, "count_macs", count_macs_needing_the_lock)
    monkeypatch.setattr(runtime, "_STALL_SECONDS", 1.5)
    with _held_by_another_thread(foreign):
        start, stalls = time.monotonic(), runtime.CrashProbe.stalls
        probe = runtime.CrashProbe(tmp_path / "m.onnx", model)
        probe.wait()  # neither raises nor waits for the 300 s limit
        assert time.monotonic() - start < 15
        assert probe.mac_total is None  # the child never got past the shape stage
        assert runtime.CrashProbe.stalls == stalls + 1


def test_parent_garbage_holding_a_session_is_not_collected_in_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hang found under libFuzzer: an onnxruntime session left in a reference cycle in the
    parent, collected by the child's garbage collector. Its destructor waits for thread-pool
    threads that the child does not have (``pthread_cond_destroy``), for ever."""
    import gc

    import numpy as np

    from onnxshrink.runtime import make_session

    model = _conv_model(tmp_path / "m.onnx")
    import onnxshrink.stats as stats

    real = stats.count_macs

    def count_macs_after_a_collection(m: onnx.ModelProto, *args: object, **kwargs: object) -> object:
        gc.collect()  # what the child's own allocations trigger sooner or later
        return real(m, *args, **kwargs)

    monkeypatch.setattr(stats, "count_macs", count_macs_after_a_collection)
    monkeypatch.setattr(runtime, "_STALL_SECONDS", 3.0)
    gc.disable()  # the cycle must still be uncollected when the parent forks
    try:
        session = make_session(model, threads=2)
        session.run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})
        time.sleep(0.5)  # the pool's threads stop spinning and block on their condition variables
        cycle: list[object] = [session]
        cycle.append(cycle)
        del session, cycle
        stalls = runtime.CrashProbe.stalls
        probe = runtime.CrashProbe(tmp_path / "m.onnx", model)
        probe.wait()
        assert runtime.CrashProbe.stalls == stalls
        assert probe.mac_total is not None
    finally:
        gc.enable()
        gc.collect()


def test_ordered_runs_two_at_once_give_the_sequential_results_in_order(tmp_path: Path) -> None:
    import numpy as np

    from onnxshrink.runtime import make_session, ordered_runs, pipelined_runs

    model = _conv_model(tmp_path / "m.onnx")
    session = make_session(model, threads=1)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)} for i in range(7)]
    expected = [session.run(None, f) for f in feeds]
    busy, most = [0], [0]
    lock = threading.Lock()

    class Slow:  # records how many runs are in flight at once
        def run(self, names: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            with lock:
                busy[0] += 1
                most[0] = max(most[0], busy[0])
            time.sleep(0.05)
            try:
                return session.run(names, feed)
            finally:
                with lock:
                    busy[0] -= 1

    got = list(ordered_runs(Slow(), None, iter(feeds), 2))
    assert len(got) == 7 and all(np.array_equal(a[0], b[0]) for a, b in zip(expected, got))
    assert most[0] == 2  # two at once, never more
    assert pipelined_runs(3, 1 << 20) == (1, 3)  # threads asked for: as asked
    assert pipelined_runs(None, None)[0] == 1  # memory of a run unknown: one at a time
    assert pipelined_runs(None, 1 << 40)[0] == 1  # a second run would add too much
    cores = len(os.sched_getaffinity(0))
    assert pipelined_runs(None, 1 << 20) == ((2, cores // 2) if cores >= 2 else (1, None))
