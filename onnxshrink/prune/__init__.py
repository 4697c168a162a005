"""Pruning passes on the ONNX graph.

Two passes, each a function that changes the model **in place** and returns a report with
``to_json()`` and ``render()`` (copy the model first to keep the original):

* :func:`prune_magnitude` (:class:`MagnitudePruneConfig`): unstructured, ``w = 0`` for the
  smallest weights. Compresses well; ONNX Runtime gains no speed from it.
* :func:`prune_channels` (:class:`ChannelPruneConfig`): structured, removes whole channels
  and everything that depends on them, found by a dependency analysis of the graph
  (:func:`analyze_channels`); the model gets smaller and faster on any runtime.

Helpers: :func:`magnitude_sensitivity` (fidelity when pruning one layer at a time),
:func:`prune_channel_indices` (remove given channels, e.g. ones known to be dead),
:func:`recalibrate_batchnorm` (re-measure BN statistics on unlabelled samples after
pruning, which recovers much of the accuracy lost without any training).

Example::

    model, _ = onnxshrink.load_model("resnet50.onnx")
    report = prune_channels(model, ChannelPruneConfig(ratio=0.5, round_to=8))
    print(report.render())
    onnxshrink.save_model(model, "resnet50.pruned.onnx")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxshrink.prune.config import ChannelPruneConfig, MagnitudePruneConfig

if TYPE_CHECKING:
    from onnxshrink.prune._layout import SkipReason
    from onnxshrink.prune.channels import prune_channel_indices, prune_channels
    from onnxshrink.prune.graph_channels import ChannelGraph, ChannelGroup, analyze_channels
    from onnxshrink.prune.magnitude import LayerSensitivity, magnitude_sensitivity, prune_magnitude
    from onnxshrink.prune.recalibrate import recalibrate_batchnorm
    from onnxshrink.prune.report import ChannelPruneReport, GroupReport, LayerSparsity, MagnitudePruneReport, PruneReport

#: Where each name lives: imported on first use, so that a command that only reads pruning
#: options (``onnxshrink shrink --quantize int8``) does not load the dependency analysis.
_LAZY = {
    "SkipReason": "_layout",
    "prune_channel_indices": "channels",
    "prune_channels": "channels",
    "ChannelGraph": "graph_channels",
    "ChannelGroup": "graph_channels",
    "analyze_channels": "graph_channels",
    "LayerSensitivity": "magnitude",
    "magnitude_sensitivity": "magnitude",
    "prune_magnitude": "magnitude",
    "recalibrate_batchnorm": "recalibrate",
    "ChannelPruneReport": "report",
    "GroupReport": "report",
    "LayerSparsity": "report",
    "MagnitudePruneReport": "report",
    "PruneReport": "report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "ChannelPruneConfig",
    "ChannelPruneReport",
    "GroupReport",
    "LayerSensitivity",
    "LayerSparsity",
    "MagnitudePruneConfig",
    "MagnitudePruneReport",
    "PruneReport",
    "SkipReason",
    "analyze_channels",
    "magnitude_sensitivity",
    "prune_channel_indices",
    "prune_channels",
    "prune_magnitude",
    "recalibrate_batchnorm",
]
