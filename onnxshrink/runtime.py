"""onnxruntime sessions, created one way everywhere (providers, threads, optimisation level)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxshrink.errors import ConfigError, ShrinkError
from onnxshrink.modelio import ort_model_source

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
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    providers: list[Any] = [(full, provider_options or {})]
    if full == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available_providers():
        providers.append("CUDAExecutionProvider")  # TensorRT's own fallback for what it cannot take
    if full != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    try:
        if isinstance(model, onnx.ModelProto):
            # Through modelio, so that a model over the protobuf limit goes via external data.
            with ort_model_source(model) as source:
                session = ort.InferenceSession(source, options, providers=providers)
        else:
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(Path(model)), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkError(f"onnxruntime cannot load the model: {first}") from exc
    session = GuardedSession(session)
    if full not in session.get_providers():
        # onnxruntime drops a provider whose libraries fail to load and carries on on CPU.
        raise ConfigError(
            f"execution provider '{provider}' is installed but failed to start (missing CUDA/TensorRT "
            "libraries?); refusing to fall back to CPU silently"
        )
    return session


class GuardedSession:
    """An ``InferenceSession`` whose ``run`` turns onnxruntime's failures (a model that cannot
    run the given inputs, a shape mismatch inside the graph) into a one-line ShrinkError."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray], *args: Any) -> list[np.ndarray]:
        try:
            return list(self._session.run(output_names, feeds, *args))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ShrinkError(f"onnxruntime failed to run the model: {text[:300]}") from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def run(session: Any, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    try:
        return list(session.run(list(outputs) if outputs else None, feeds))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkError(f"onnxruntime failed to run the model: {first}") from exc


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), after big phases."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
