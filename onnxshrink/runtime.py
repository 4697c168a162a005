"""onnxruntime sessions, created one way everywhere (providers, threads, optimisation level).

Running a model runs code its author chose: a 300-byte graph can ask for gigabytes
(``ConstantOfShape``/``Expand`` to a giant shape) or never finish (a ``Loop`` with a trip count
of 2**62). Every session made here is therefore bounded:

* memory (CPU sessions): creation and every ``run`` happen under a soft address-space limit
  (``RLIMIT_AS``) of what the process already maps plus :func:`memory_bound` bytes (plus a
  few times the weights for creation); an allocation past it fails inside onnxruntime and
  becomes a one-line error. Linux only; a no-op elsewhere. ``ONNXSHRINK_MAX_MEMORY``
  (bytes, or with a K/M/G/T suffix; ``0`` turns it off) sets it, default 8 GiB.
* time: each ``run`` is watched; past :func:`time_bound` seconds onnxruntime's terminate
  flag is raised, which stops the run between two kernels (Loop iterations included), and
  the run fails with a one-line error. ``ONNXSHRINK_MAX_RUN_SECONDS`` (``0``: off), default
  300. A single kernel that never returns is not interrupted.

The two guards cost about 10 microseconds per run (the mapped size is re-read at most every
10 ms; a run that fails for memory under a cached figure is retried with a fresh one).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxshrink.errors import ConfigError, ShrinkError
from onnxshrink.modelio import ort_model_source, weights_nbytes

log = logging.getLogger(__name__)

#: Short names accepted by ``--provider``.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _ort() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # errors reach the user through our own one-line messages
    return ort


MAX_MEMORY_ENV = "ONNXSHRINK_MAX_MEMORY"
MAX_RUN_SECONDS_ENV = "ONNXSHRINK_MAX_RUN_SECONDS"
DEFAULT_MAX_MEMORY = 8 << 30
DEFAULT_MAX_RUN_SECONDS = 300.0
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_bound() -> int | None:
    """Bytes one onnxruntime step may add to the process (``None``: unbounded)."""
    text = os.environ.get(MAX_MEMORY_ENV, "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_MAX_MEMORY
    try:
        value = int(float(text[:-1]) * _SUFFIXES[text[-1]]) if text[-1] in _SUFFIXES else int(text)
    except (ValueError, KeyError):
        raise ConfigError(f"{MAX_MEMORY_ENV}={os.environ[MAX_MEMORY_ENV]!r}: expected bytes, e.g. 16G") from None
    return value if value > 0 else None


def time_bound() -> float | None:
    """Seconds one ``run`` of a model may take (``None``: unbounded)."""
    text = os.environ.get(MAX_RUN_SECONDS_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_MAX_RUN_SECONDS
    except ValueError:
        raise ConfigError(f"{MAX_RUN_SECONDS_ENV}={text!r}: expected seconds, e.g. 600") from None
    return value if value > 0 else None


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.0f} TiB"


class _AddressSpace:
    """Temporarily lower the soft RLIMIT_AS to (mapped now + extra); nested uses are no-ops.

    Reading the mapped size costs a few microseconds, so within :data:`REFRESH_SECONDS` of the
    last reading the cached figure is used; a run that then fails for memory is retried once
    with a fresh one (:meth:`refresh_if_stale`), so a stale figure never causes a false error.
    """

    REFRESH_SECONDS = 0.01

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: tuple[int, int] | None = None
        self._statm: int | None = None
        self._pid = -1
        self._mapped = 0
        self._stamp = -1.0
        self.cached = False  # whether the last enter() used a cached figure
        try:
            import resource

            self._resource: Any = resource
            self._page = os.sysconf("SC_PAGE_SIZE")
            self.mapped()
        except (ImportError, OSError, ValueError):
            self._resource = None

    def mapped(self) -> int:
        if self._pid != os.getpid():  # /proc/self was resolved when opened: reopen after fork
            if self._statm is not None:
                with contextlib.suppress(OSError):
                    os.close(self._statm)
            self._statm = os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._pid = os.getpid()
        self._mapped = int(os.pread(self._statm, 64, 0).split()[0]) * self._page
        self._stamp = time.monotonic()
        return self._mapped

    def refresh_if_stale(self) -> bool:
        """After a failure under a cached figure: re-read it; True if it had grown (retry)."""
        if not self.cached or self._resource is None:
            return False
        before = self._mapped
        return self.mapped() > before

    def enter(self, extra: int | None) -> None:
        """Lower the limit (pair every call with :meth:`exit`; plain calls: this runs per ``run``)."""
        if extra is None or self._resource is None:
            return
        res = self._resource
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                soft, hard = res.getrlimit(res.RLIMIT_AS)
                self.cached = self._pid == os.getpid() and time.monotonic() - self._stamp < self.REFRESH_SECONDS
                want = (self._mapped if self.cached else self.mapped()) + extra
                if hard != res.RLIM_INFINITY:
                    want = min(want, hard)
                if soft == res.RLIM_INFINITY or want < soft:
                    res.setrlimit(res.RLIMIT_AS, (want, hard))
                    self._saved = (soft, hard)

    def exit(self, extra: int | None) -> None:
        if extra is None or self._resource is None:
            return
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._saved is not None:
                self._resource.setrlimit(self._resource.RLIMIT_AS, self._saved)
                self._saved = None

    @contextlib.contextmanager
    def limit(self, extra: int | None) -> Iterator[None]:
        self.enter(extra)
        try:
            yield
        finally:
            self.exit(extra)


_ADDRESS_SPACE = _AddressSpace()


def bounded_memory() -> contextlib.AbstractContextManager[None]:
    """The session memory bound, for other native code that runs on the model (onnx's shape
    inference with data propagation can build a hostile model's tensors too)."""
    return _ADDRESS_SPACE.limit(memory_bound())


class _Watchdog:
    """One daemon thread that raises ``RunOptions.terminate`` on runs past their deadline.

    Registering a run is one dict insert (atomic under the GIL, no lock); the thread polls
    every :data:`POLL_SECONDS` instead of being woken per run (waking it costs ~100 us a run).
    """

    POLL_SECONDS = 0.25

    def __init__(self) -> None:
        self._active: dict[int, tuple[float, Any, list[bool]]] = {}
        self._keys = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._start_lock = threading.Lock()

    def start(self, run_options: Any, seconds: float | None) -> tuple[int, list[bool]]:
        """Watch a run; returns the key for :meth:`stop` and a flag set if the deadline passed."""
        fired = [False]
        if seconds is None:
            return 0, fired
        key = next(self._keys)
        self._active[key] = (time.monotonic() + seconds, run_options, fired)
        if self._pid != os.getpid():  # first run, or a forked child (threads do not survive fork)
            with self._start_lock:
                if self._pid != os.getpid():
                    self._thread = threading.Thread(target=self._loop, name="onnxshrink-watchdog", daemon=True)
                    self._thread.start()
                    self._pid = os.getpid()
        return key, fired

    def stop(self, key: int) -> None:
        self._active.pop(key, None)

    def _loop(self) -> None:
        while True:
            time.sleep(self.POLL_SECONDS)
            now = time.monotonic()
            for deadline, run_options, fired in list(self._active.values()):
                if now >= deadline and not fired[0]:
                    fired[0] = True
                    run_options.terminate = True


_WATCHDOG = _Watchdog()


def _reinit_locks_after_fork() -> None:
    """A forked child (the crash probe) has only the forking thread: a lock that another
    thread held at the fork would stay held for ever in the child."""
    _ADDRESS_SPACE._lock = threading.Lock()
    _ADDRESS_SPACE._depth, _ADDRESS_SPACE._saved = 0, None  # the child sets its own limits
    _WATCHDOG._start_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)

_ALLOCATION_FAILURES = ("failed to allocate", "bad_alloc", "bad allocation", "available memory of", "cannot allocate memory")


def _memory_error(exc: BaseException, bound: int | None) -> ShrinkError | None:
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(s in text for s in _ALLOCATION_FAILURES):
        if bound is None:
            return ShrinkError("onnxruntime ran out of memory running the model")
        return ShrinkError(
            f"running the model needs more than its memory bound of {human_bytes(bound)}; "
            f"if the model is trusted, raise it with {MAX_MEMORY_ENV}=32G (0: no bound)"
        )
    return None


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def resolve_provider(name: str) -> str:
    """Map ``cpu``/``cuda``/... (or a full provider name) to an installed provider, or fail."""
    full = PROVIDERS.get(name.lower(), name)
    available = available_providers()
    if full not in available:
        short = [k for k, v in PROVIDERS.items() if v in available] or available
        raise ConfigError(
            f"execution provider '{name}' is not available in this onnxruntime build "
            f"(available: {', '.join(short)}); install the matching onnxruntime package "
            "(e.g. onnxruntime-gpu for cuda/tensorrt)"
        )
    return full


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    provider: str = "cpu",
    threads: int | None = 1,
    optimization: str = "all",
    optimized_model_path: str | os.PathLike[str] | None = None,
    provider_options: dict[str, Any] | None = None,
    enable_profiling: bool = False,
    memory_arena: bool = True,
    memory_pattern: bool = True,
    config_entries: dict[str, str] | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on exactly the requested provider.

    GPU providers get the CPU provider as fallback for nodes they cannot run (as
    onnxruntime requires); a provider that is not installed is an error, never a silent
    CPU fallback.
    """
    ort = _ort()
    full = resolve_provider(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    options.enable_profiling = enable_profiling
    # One-off sessions (calibration with every activation exposed) are better off without
    # the arena, which keeps its peak for the session's life.
    options.enable_cpu_mem_arena = memory_arena
    # A graph that exposes every activation to extra consumers (calibration summaries) gets
    # a memory pattern that keeps far more alive at once: off, ConvNeXt-T's calibration peak
    # went from 1093 to 795 MiB and DenseNet-121's from 555 to 385 MiB, at the same speed.
    options.enable_mem_pattern = memory_pattern
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    providers: list[Any] = [(full, provider_options or {})]
    if full == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available_providers():
        providers.append("CUDAExecutionProvider")  # TensorRT's own fallback for what it cannot take
    if full != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    # GPU runtimes reserve huge address ranges (CUDA's unified addressing) and fail under an
    # address-space limit, so the memory bound applies to CPU sessions only.
    bound = memory_bound() if full == "CPUExecutionProvider" else None
    # Creation holds the weights (several copies while prepacking) and may fold constants.
    if isinstance(model, onnx.ModelProto):
        weights = weights_nbytes(model)
    elif isinstance(model, bytes):
        weights = len(model)
    else:
        weights = _files_size(Path(model))
    try:
        with _ADDRESS_SPACE.limit(None if bound is None else bound + 4 * weights):
            if isinstance(model, onnx.ModelProto):
                # Through modelio, so that a model over the protobuf limit goes via external data.
                with ort_model_source(model) as source:
                    session = ort.InferenceSession(source, options, providers=providers)
            else:
                session = ort.InferenceSession(model if isinstance(model, bytes) else str(Path(model)), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        memory = _memory_error(exc, bound)
        if memory is not None:
            raise memory from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkError(f"onnxruntime cannot load the model: {first}") from exc
    session = GuardedSession(session, memory=bound is not None)
    if full not in session.get_providers():
        # onnxruntime drops a provider whose libraries fail to load and carries on on CPU.
        raise ConfigError(
            f"execution provider '{provider}' is installed but failed to start (missing CUDA/TensorRT "
            "libraries?); refusing to fall back to CPU silently"
        )
    return session


def _files_size(path: Path) -> int:
    """The model file plus the files beside it (its external data, at most)."""
    try:
        if not path.is_file():
            return 0
        entries = list(itertools.islice(path.parent.iterdir(), 1000))
        return sum(p.stat().st_size for p in entries if p.is_file())
    except OSError:
        return 0


class GuardedSession:
    """An ``InferenceSession`` whose ``run`` is bounded in memory and time (see the module
    docstring) and turns onnxruntime's failures (a model that cannot run the given inputs, a
    shape mismatch inside the graph, a bound hit) into a one-line ShrinkError."""

    def __init__(self, session: Any, *, memory: bool = True) -> None:
        self._session = session
        self._run_options = _ort().RunOptions
        # Read once: the environment is parsed per session, not per run.
        self._bounds = (memory_bound() if memory else None, time_bound())

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray], run_options: Any = None) -> list[np.ndarray]:
        run_options = run_options if run_options is not None else self._run_options()
        bound, seconds = self._bounds
        key, fired = _WATCHDOG.start(run_options, seconds)
        try:
            for attempt in (0, 1):
                _ADDRESS_SPACE.enter(bound)
                try:
                    return list(self._session.run(output_names, feeds, run_options))
                except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                    if fired[0]:
                        raise ShrinkError(
                            f"running the model took longer than its time bound of {seconds:g} s (a Loop "
                            f"that never ends?); if the model is trusted, raise it with {MAX_RUN_SECONDS_ENV}=3600 (0: no bound)"
                        ) from None
                    memory = _memory_error(exc, bound)
                    if memory is None:
                        text = " ".join(str(exc).split()) or type(exc).__name__
                        raise ShrinkError(f"onnxruntime failed to run the model: {text[:300]}") from exc
                    if attempt == 1 or not _ADDRESS_SPACE.refresh_if_stale():
                        raise memory from None
                finally:
                    _ADDRESS_SPACE.exit(bound)
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            _WATCHDOG.stop(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def run(session: Any, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    try:
        return list(session.run(list(outputs) if outputs else None, feeds))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkError(f"onnxruntime failed to run the model: {first}") from exc


#: A second run at once only if it adds at most this much memory (peak memory matters as
#: much as time: ConvNeXt-T's calibration, 320 MB of activations a run, went 728 -> 1062 MiB).
_MAX_SECOND_RUN_BYTES = 256 << 20


def pipelined_runs(threads: int | None, run_bytes: int | None) -> tuple[int, int | None]:
    """How to run many samples through one session: ``(runs at once, threads per run)``.

    With ``threads=None`` (all cores) and two cores or more, two samples run at once on half
    the cores each: the cores stay busier than one run spread over all of them (on 2 cores,
    32 samples of ConvNeXt-T's calibration model: 3.2 -> 2.7 s, DenseNet-121's: 1.7 -> 1.5 s).
    Only if the second run's memory (``run_bytes``: one run's, estimated; None: unknown) is
    small: int8's fidelity runs use it; calibration, whose runs are fp32, does not.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    bound = memory_bound()
    fits = run_bytes is not None and run_bytes <= _MAX_SECOND_RUN_BYTES and (bound is None or 4 * run_bytes <= bound)
    if threads is not None or cores < 2 or not fits:
        return 1, threads
    return 2, cores // 2


def ordered_runs(session: Any, output_names: Sequence[str] | None, feeds: Iterator[Any], at_once: int) -> Iterator[list[np.ndarray]]:
    """``session.run`` on each of ``feeds``, up to ``at_once`` at a time (onnxruntime runs
    concurrent calls, without the GIL); results in the order of ``feeds``, which are read at
    most ``at_once`` ahead."""
    if at_once <= 1:
        for feed in feeds:
            yield session.run(output_names, feed)
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="onnxshrink-run") as pool:
        window: deque[Future[list[np.ndarray]]] = deque()
        try:
            for feed in feeds:
                window.append(pool.submit(session.run, output_names, feed))
                if len(window) >= at_once:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), after big phases."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


#: How long the child may take to create a session for the crash probe.
_PROBE_SECONDS = 300.0
#: How long the probe's one run may take; a slower run is cut short, not a failure.
_PROBE_RUN_SECONDS = 5.0
#: A forked child (crash probe, job) that has used no CPU time for this long is stuck, not
#: working. Where there is no /proc (macOS), stalls are not detected: only the time limits.
_STALL_SECONDS = 10.0
_PROBE_POLL_SECONDS = 0.5


def _await_child(child: Any, seconds: float) -> str:
    """Wait for a forked child: ``"exited"``, or ``"timeout"`` after ``seconds``, or
    ``"stalled"`` once it has used no CPU for :data:`_STALL_SECONDS` (killed in both)."""
    deadline = time.monotonic() + seconds
    ticks, since = _cpu_ticks(child.pid), time.monotonic()
    while True:
        child.join(_PROBE_POLL_SECONDS)  # returns at once when the child ends
        if child.exitcode is not None:
            return "exited"
        now = time.monotonic()
        latest = _cpu_ticks(child.pid)
        if latest is None or latest != ticks:
            ticks, since = latest, now
        ending = "timeout" if now >= deadline else "stalled" if now - since >= _STALL_SECONDS else None
        if ending is not None:
            child.kill()
            child.join()
            return ending


def _cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of process ``pid`` in clock ticks (None where /proc is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def check_onnxruntime_survives(model_path: str | os.PathLike[str]) -> None:
    """Create a session for ``model_path``, and run it once, in a child process first.

    onnxruntime crashes the whole process (SIGSEGV) on some malformed models that pass the
    onnx checker, e.g. an opset-23 LayerNormalization whose scale is a graph input (found by
    fuzzing), at session creation or at the first run; onnx's own shape inference aborts on
    others. A crash cannot be caught in-process, so a forked child first runs onnx's shape
    inference, then makes the first session and runs it once on zero-filled inputs (ones for
    integers, symbolic dims set to 1) within :data:`_PROBE_RUN_SECONDS` and the memory bound:
    if the child dies by a signal, the model is refused in one line naming the stage. An
    ordinary error, or a run that is too slow or too big for the probe, is left for the real
    work to report; so is a child that stalls without using the CPU (a lock inherited across
    fork from another thread). Linux/macOS only (fork); elsewhere this does nothing.
    """
    CrashProbe(model_path).wait()


class CrashProbe:
    """:func:`check_onnxruntime_survives` in two halves, so that work that does not touch
    onnxruntime can run while the child tries the model: start it, then :meth:`wait` before
    this process makes its first session."""

    #: Children found stalled (and skipped) in this process so far.
    stalls = 0

    def __init__(self, model_path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> None:
        self.model_path = str(model_path)
        self.child: Any = None
        self._stages = -1
        #: The model's MAC total as the child counted it (``model`` given) with onnx's shape
        #: inference: ``(total,)``, the total None when some shape stayed unknown (shapes
        #: computed at run time: ``count_macs`` with symbolic inference may know them); None
        #: if the child did not get that far.
        self.mac_total: tuple[int | None] | None = None
        if hasattr(os, "fork"):
            # The child reports each stage it enters on this pipe, so that a crash is named.
            self._stages, write_end = os.pipe()
            try:
                self.child = _start_forked(_probe_child, (self.model_path, model, write_end))
            except OSError as exc:  # no fork (memory, process limit): no probe, said plainly
                os.close(self._stages)
                self._stages = -1
                raise ShrinkError(f"cannot start the crash probe's child process ({exc.strerror or exc})", path=self.model_path) from None
            finally:
                os.close(write_end)

    def _stage(self) -> bytes:
        """The last stage the child entered (and the MAC total, if it reported one)."""
        if self._stages < 0:
            return b""
        data = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(self._stages, 64):
                data += chunk
        os.close(self._stages)
        self._stages = -1
        stages, _, report = data.partition(_MACS_REPORT)
        if b";" in report:
            stages += report[report.index(b";") + 1 :]
            total = report[: report.index(b";")]
            self.mac_total = (int(total) if total.isdigit() else None,)
        return stages[-1:]

    def cancel(self) -> None:
        """Stop the child (the command failed for another reason first)."""
        child, self.child = self.child, None
        if child is not None and child.exitcode is None:
            child.kill()
            child.join()
        self._stage()

    def wait(self) -> None:
        """Raise :class:`ShrinkError` if onnxruntime crashed (or hung) on the model in the child."""
        import signal

        child, self.child = self.child, None
        if child is None:
            return
        ending = _await_child(child, _PROBE_SECONDS)
        stage = self._stage()
        if ending == "timeout":
            raise ShrinkError(f"onnx and onnxruntime did not finish with the model within {_PROBE_SECONDS:.0f} s", path=self.model_path)
        if ending == "stalled":
            # Blocked for good on something that a thread of this process held when it
            # forked (the child has no such thread), not working on the model: inconclusive,
            # like the OOM killer.
            CrashProbe.stalls += 1
            log.info("crash probe: the child stalled (stage %r, no CPU for %.0f s); skipped", stage.decode(), _STALL_SECONDS)
            return
        if child.exitcode == -getattr(signal, "SIGKILL", 9):
            return  # the kernel's out-of-memory killer (or a user): says nothing about a crash
        if child.exitcode < 0:
            try:
                name = signal.Signals(-child.exitcode).name
            except ValueError:
                name = f"signal {-child.exitcode}"
            what = "onnx's shape inference crashes" if stage == _STAGE_SHAPES else "onnxruntime crashes"
            when = "on this model" if stage == _STAGE_SHAPES else "when it loads or runs this model"
            raise ShrinkError(f"{what} ({name}) {when} (tried in a child process); it cannot be processed", path=self.model_path)


_STAGE_SHAPES, _STAGE_SESSION = b"s", b"o"
#: Precedes the MAC total (decimal, or "-" if unknown) and its closing ";" on the stage pipe.
_MACS_REPORT = b"m"


def _start_forked(target: Any, args: tuple[Any, ...]) -> Any:
    """A started, forked ``multiprocessing`` child running ``target(*args)``."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_run_child, args=(target, args), daemon=True)
    # Objects that exist at the fork must stay out of the child's garbage collection: an
    # onnxruntime session left in a reference cycle, collected in the child, waits in its
    # destructor for thread-pool threads that the child does not have (pthread_cond_destroy),
    # for ever (found by fuzzing, a long-lived process). The collector is off across the
    # fork, and the child freezes everything it inherited before turning it back on.
    enabled = gc.isenabled()
    gc.disable()
    try:
        child.start()
    finally:
        if enabled:
            gc.enable()
    return child


def _run_child(target: Any, args: tuple[Any, ...]) -> None:
    gc.freeze()  # what the parent had: never collected here
    gc.enable()
    target(*args)


def _quiet_child() -> None:
    """In a forked child: die plainly by a signal, and print nothing."""
    import signal

    # Handlers inherited from the parent (faulthandler, a fuzzer's crash handler) must not
    # act for the child.
    for name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        import faulthandler

        faulthandler.disable()
    except Exception:  # noqa: BLE001 - best effort
        pass
    # A failed C++ assertion prints before it aborts: the command's output stays one line.
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


class ForkedJob:
    """``fn(*args)`` in a forked child, its JSON result read back later: work that this
    process needs later runs beside it, and whatever it imports or allocates (sympy, for
    onnxruntime's symbolic shape inference: 33 MiB) stays out of this process.

    :meth:`result` gives None if the child failed, crashed, stalled or ran out of time; the
    caller then does the work itself. Linux/macOS only (fork); elsewhere always None.
    """

    def __init__(self, fn: Any, *args: Any) -> None:
        self._path: str | None = None
        self.child: Any = None
        if hasattr(os, "fork"):
            import tempfile

            try:
                fd, self._path = tempfile.mkstemp(prefix="onnxshrink-job-", suffix=".json")
                os.close(fd)
                self.child = _start_forked(_job_child, (fn, args, self._path))
            except OSError:  # no temporary file, or no fork (memory, process limit): do without
                self.cancel()

    def result(self, seconds: float = 120.0) -> Any:
        child, self.child = self.child, None
        path, self._path = self._path, None
        try:
            if child is None or path is None:
                return None
            if _await_child(child, seconds) != "exited" or child.exitcode != 0:
                return None
            import json

            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
        finally:
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def cancel(self) -> None:
        child, self.child = self.child, None
        if child is not None and child.exitcode is None:
            child.kill()
            child.join()
        path, self._path = self._path, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _job_child(fn: Any, args: tuple[Any, ...], path: str) -> None:
    _quiet_child()
    try:
        import json

        value = fn(*args)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f)
    except BaseException:  # noqa: BLE001 - the parent does the work itself
        os._exit(1)
    os._exit(0)


def _probe_child(model_path: str, model: onnx.ModelProto | None, stages: int) -> None:
    _quiet_child()
    # onnx's C++ shape inference aborts on some malformed nodes that pass the checker (a
    # Split whose outputs outnumber its num_outputs, found by fuzzing): the MAC count the
    # parent makes next runs it, so it is tried here first, the same way.
    os.write(stages, _STAGE_SHAPES)
    try:
        if model is not None:
            from onnxshrink.stats import count_macs

            # onnx's inference only: where shapes are computed at run time (ShuffleNet's
            # channel shuffle), the parent has the symbolic count (sympy, half a second)
            # made in a job beside its own work instead of waiting for it here.
            total = count_macs(model, symbolic=False).total
            # The parent reads it instead of counting again.
            os.write(stages, _MACS_REPORT + (b"-" if total is None else str(total).encode()) + b";")
        else:
            onnx.shape_inference.infer_shapes(onnx.load(model_path, load_external_data=False), strict_mode=False, data_prop=True)
    except BaseException:  # noqa: BLE001 - an ordinary error is the parent's to report
        pass
    os.write(stages, _STAGE_SESSION)
    try:
        ort = _ort()
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    except BaseException:  # noqa: BLE001 - an ordinary error is the real session's to report
        os._exit(0)
    try:
        feeds = {i.name: _probe_feed(i) for i in session.get_inputs()}
        bound = memory_bound()
        if bound is not None:
            import resource

            # This child does nothing else: a process-wide limit is exactly the bound wanted.
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = _ADDRESS_SPACE.mapped() + bound
            resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        run_options = ort.RunOptions()
        # No longer than a real run may take (ONNXSHRINK_MAX_RUN_SECONDS), so that a model
        # that never ends is not waited on twice.
        seconds = min(_PROBE_RUN_SECONDS, time_bound() or _PROBE_RUN_SECONDS)
        threading.Timer(seconds, lambda: setattr(run_options, "terminate", True)).start()
        session.run(None, feeds, run_options)
    except BaseException:  # noqa: BLE001 - as above; too slow or too big is not a crash
        pass
    os._exit(0)


_PROBE_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def _probe_feed(node_arg: Any) -> np.ndarray:
    """An input of the declared type and shape, symbolic dims as 1 (``KeyError``: not a plain
    tensor): zeros for floats, ones for integers (zero divisors would trap integer kernels
    with SIGFPE, refusing a sound model)."""
    shape = [d if isinstance(d, int) and d >= 0 else 1 for d in (node_arg.shape or [])]
    if int(np.prod(shape, dtype=np.float64)) > 1 << 28:
        raise ValueError("input too large for the probe")
    dtype = np.dtype(_PROBE_DTYPES[node_arg.type])
    return np.zeros(shape, dtype) if dtype.kind == "f" else np.ones(shape, dtype)
