"""Structured channel pruning: remove whole channels so the model is smaller and faster.

``prune_channels`` analyses the graph (:mod:`onnxshrink.prune.graph_channels`), ranks the
units of every prunable group by importance, keeps the best ``1 - ratio`` of them and
physically removes the rest from every weight, bias, norm parameter, attribute and shape
constant that depends on them. Both entry points change the model **in place** and return
a :class:`~onnxshrink.prune.report.ChannelPruneReport`; copy the model first to keep it.

Importance of a unit is summed over the group's producers: the L1 or L2 norm of each
producing filter (or |gamma| of the group's BatchNormalization nodes), normalised to mean 1
per producer so that a wide layer does not outvote a narrow one.

For ``target_mac_reduction`` the MACs of a candidate ratio are predicted from the MACs
:func:`onnxshrink.stats.count_macs` gives each node before pruning, scaled by the kept
share of the node's input and output channels (which is exact); the smallest ratio whose
prediction reaches the target is found by bisection. The report's MAC figures are counted
on the pruned model itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxshrink.errors import ConfigError, UnsupportedModelError
from onnxshrink.prune._graph import count_parameters, require_weights
from onnxshrink.prune._layout import Seg, Selection, SkipReason, SliceConst, layout_length, layout_spaces
from onnxshrink.prune._surgery import Plan, apply_plan, plan_selection
from onnxshrink.prune.config import ChannelPruneConfig, compile_pattern, pattern_matches
from onnxshrink.prune.magnitude import require_finite
from onnxshrink.prune.graph_channels import ChannelGraph, ChannelGroup, analyze_channels
from onnxshrink.prune.report import ChannelPruneReport, GroupReport
from onnxshrink.stats import MacCount, count_macs, infer_shapes, weightless_copy

log = logging.getLogger(__name__)

#: The highest ratio the MAC-target search tries.
MAX_SEARCH_RATIO = 0.99


def prune_channels(
    model: onnx.ModelProto,
    config: ChannelPruneConfig,
    *,
    input_shapes: dict[str, list[int]] | None = None,
) -> ChannelPruneReport:
    """Remove the least important channels of every prunable group, in place.

    Args:
        model: the model to prune (changed in place).
        config: how much and what to prune.
        input_shapes: concrete shapes for inputs with dynamic dimensions other than the
            batch (used by shape inference and MAC counting).

    Returns:
        The report: groups pruned, unchanged or skipped (with reasons), MACs, parameters.

    Raises:
        ConfigError: a ``per_layer`` key matches no producing layer.
    """
    require_weights(model)
    check_conv_shapes(model)
    graph = analyze_channels(model, input_shapes=input_shapes)
    _apply_exclude(graph, config.exclude)
    overrides = _overrides(graph, config.per_layer)
    macs_before = count_macs(model, input_shapes)
    chooser = _Chooser(graph, config)
    notes: list[str] = []
    target_met: bool | None = None
    if config.ratio is not None:
        ratio = config.ratio
    else:
        assert config.target_mac_reduction is not None
        ratio, target_met = _search_ratio(
            graph, chooser, overrides, macs_before, config.target_mac_reduction, notes
        )
    kept = chooser.choose(ratio, overrides)
    return _finish(
        model, graph, kept, config.to_dict(), macs_before, input_shapes,
        ratio=ratio, target_met=target_met, notes=notes,
        ratios={root: overrides.get(root, ratio) for root in kept}, importance=chooser.sources,
    )  # fmt: skip


def check_conv_shapes(model: onnx.ModelProto) -> None:
    """Refuse layers whose weight or bias cannot fit their input (the model cannot run).

    Conv, ConvTranspose, Gemm and MatMul with a constant weight are checked against the
    inferred input. The checker lets such a graph by and nothing runs it before pruning,
    whose plan would then index channels that do not exist.
    """
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    layers = [
        n for n in model.graph.node
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.domain in ("", "ai.onnx") and len(n.input) > 1 and n.input[1] in dims
    ]  # fmt: skip
    if not layers:
        return
    shapes = infer_shapes(weightless_copy(model))
    for node in layers:
        weight = dims[node.input[1]]
        source = shapes.get(node.input[0])
        attrs = {a.name: a.i for a in node.attribute}
        bias = dims.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if node.op_type in ("Conv", "ConvTranspose"):
            if len(weight) < 2:
                continue
            group = attrs.get("group", 1)
            transposed = node.op_type == "ConvTranspose"
            expected_in = weight[0] if transposed else weight[1] * group
            outputs = weight[1] * group if transposed else weight[0]
            axis = 1
        elif node.op_type == "Gemm":
            if len(weight) != 2 or attrs.get("transA", 0):
                continue
            expected_in, outputs = (weight[1], weight[0]) if attrs.get("transB", 0) else (weight[0], weight[1])
            axis = -1
            bias = bias if bias is not None and len(bias) == 1 else None  # Gemm's C broadcasts
        else:  # MatMul
            if len(weight) < 2:
                continue
            expected_in, outputs, axis, bias = weight[-2], weight[-1], -1, None
        channels = source[axis] if source is not None and len(source) > 1 and isinstance(source[axis], int) else None
        if (channels is not None and channels != expected_in) or (bias is not None and bias != [outputs] and bias != [1]):
            raise UnsupportedModelError(
                f"{node.op_type} '{node.name or node.output[0]}': weight {weight} (bias {bias}) does not fit its "
                f"input of {channels} channels; the model cannot run"
            )


def prune_channel_indices(
    model: onnx.ModelProto,
    remove: Mapping[str, Sequence[int]],
    *,
    input_shapes: dict[str, list[int]] | None = None,
) -> ChannelPruneReport:
    """Remove exactly the given units of the given groups, in place.

    Args:
        model: the model to prune (changed in place).
        remove: unit indices to remove, keyed by group id (``"g3"``, as
            :func:`~onnxshrink.prune.graph_channels.analyze_channels` numbers them), by a
            producing node's name or by its weight's name. A unit is one channel except in
            groups that a grouped convolution couples (see ``ChannelGroup.units``).
        input_shapes: as for :func:`prune_channels`.

    Raises:
        ConfigError: an unknown key, a group that cannot be pruned (with the reasons),
            indices out of range, or all units of a group.
    """
    require_weights(model)
    check_conv_shapes(model)
    graph = analyze_channels(model, input_shapes=input_shapes)
    kept: dict[int, list[int]] = {}
    for key, indices in remove.items():
        group = graph.find_group(key)
        if group is None:
            raise ConfigError(f"no channel group is named or produced by '{key}'")
        if not group.prunable:
            raise ConfigError(
                f"group {group.id} ('{key}') cannot be pruned: {'; '.join(map(str, group.skip_reasons))}"
            )
        drop = {int(i) for i in indices}
        if any(not 0 <= i < group.units for i in drop):
            raise ConfigError(
                f"group {group.id} ('{key}') has units 0..{group.units - 1}; got {sorted(drop)}"
            )
        if len(drop) >= group.units:
            raise ConfigError(f"cannot remove every unit of group {group.id} ('{key}')")
        kept[group.root] = [u for u in range(group.units) if u not in drop]
    macs_before = count_macs(model, input_shapes)
    config = {"remove": {k: sorted(int(i) for i in v) for k, v in remove.items()}}
    return _finish(
        model,
        graph,
        kept,
        config,
        macs_before,
        input_shapes,
        ratio=None,
        target_met=None,
        notes=[],
        ratios={},
        importance={},
    )


# --------------------------------------------------------------------------- selection


def _apply_exclude(graph: ChannelGraph, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for group in graph.groups:
            hit = pattern_matches(pattern, [*group.producers, *group.nodes, *group.weights])
            if hit is not None:
                graph.skip(group, SkipReason("excluded", f"excluded by pattern '{pattern}' ('{hit}')"))


def _producer_names(graph: ChannelGraph, group: ChannelGroup) -> list[str]:
    names = list(group.producers)
    for sid in group.spaces:
        node = graph.index.nodes[graph.spaces[sid].node]
        if len(node.input) > 1:
            names.append(node.input[1])
    return names


def _overrides(graph: ChannelGraph, per_layer: Mapping[str, float]) -> dict[int, float]:
    """Per-group ratios from ``per_layer`` (the smallest when several keys match)."""
    out: dict[int, float] = {}
    for key, ratio in per_layer.items():
        compile_pattern(key)
        matched = False
        for group in graph.groups:
            if pattern_matches(key, _producer_names(graph, group)) is not None:
                matched = True
                out[group.root] = min(ratio, out.get(group.root, ratio))
        if not matched:
            raise ConfigError(f"per_layer key '{key}' matches no Conv/Gemm/MatMul node or weight name")
    return out


class _Chooser:
    """Ranks each prunable group's units once, then picks the kept ones for any ratio."""

    def __init__(self, graph: ChannelGraph, config: ChannelPruneConfig) -> None:
        self.graph = graph
        self.config = config
        self.scores: dict[int, np.ndarray] = {}
        self.sources: dict[int, str] = {}
        for group in graph.groups:
            if group.prunable:
                self.scores[group.root], self.sources[group.root] = _importance(
                    graph, group, config.importance
                )

    def keep_count(self, group: ChannelGroup, ratio: float) -> int:
        units, width = group.units, group.unit_width
        keep = units - math.floor(ratio * units + 1e-9)
        keep = max(keep, -(-self.config.min_channels // width), 1)
        step = self.config.round_to // math.gcd(self.config.round_to, width)
        return min(units, -(-keep // step) * step)

    def choose(self, ratio: float, overrides: Mapping[int, float]) -> dict[int, list[int]]:
        kept: dict[int, list[int]] = {}
        for group in self.graph.groups:
            if not group.prunable:
                continue
            count = self.keep_count(group, overrides.get(group.root, ratio))
            order = np.argsort(-self.scores[group.root], kind="stable")
            kept[group.root] = sorted(int(u) for u in order[:count])
        return kept


def _importance(graph: ChannelGraph, group: ChannelGroup, kind: str) -> tuple[np.ndarray, str]:
    """Per-unit scores of ``group`` and the criterion actually used."""
    ix, units = graph.index, group.units
    members = set(group.spaces)
    scores = np.zeros(units, dtype=np.float64)

    def add(per_channel: np.ndarray) -> None:
        per_unit = per_channel.reshape(units, -1).sum(axis=1)
        mean = per_unit.mean()
        scores[:] += per_unit / mean if mean > 0 else per_unit

    if kind == "bn_gamma":
        found = False
        for gsrc in graph.gammas:
            if gsrc.space in members:
                gamma = ix.const(ix.nodes[gsrc.node].input[gsrc.input])
                if gamma is not None:
                    require_finite(ix.nodes[gsrc.node].input[gsrc.input], gamma, "channel pruning (bn_gamma)")
                    size = graph.spaces[gsrc.space].size
                    add(np.abs(gamma[gsrc.offset : gsrc.offset + size].astype(np.float64)))
                    found = True
        if found:
            return scores, "bn_gamma"
        kind = "l1"
        used = "l1 (no BatchNormalization)"
    else:
        used = kind
    for src in graph.filters:
        if src.space in members:
            weight = ix.const(ix.nodes[src.node].input[src.input])
            if weight is None:
                continue
            require_finite(ix.nodes[src.node].input[src.input], weight, "channel pruning")
            rows = np.moveaxis(weight, src.axis, 0).reshape(weight.shape[src.axis], -1)
            if kind == "l1":
                add(np.abs(rows).sum(axis=1, dtype=np.float64))
            else:
                add(np.sqrt(np.square(rows).sum(axis=1, dtype=np.float64)))
    return scores, used


# --------------------------------------------------------------------------- MACs


def _predicted_node_macs(
    graph: ChannelGraph, selection: Selection, macs: MacCount
) -> dict[int, tuple[int, int]]:
    """MACs of each counted producer node before and after ``selection``: node -> (before, after)."""
    out: dict[int, tuple[int, int]] = {}
    for term in graph.mac_terms:
        before = macs.by_node.get(graph.index.key(term.node), 0)
        after = before * selection.length(term.outputs) // layout_length(term.outputs)
        if term.inputs is not None and layout_length(term.inputs):
            after = after * selection.length(term.inputs) // layout_length(term.inputs)
        out[term.node] = (before, after)
    return out


def _predicted_total(graph: ChannelGraph, kept: Mapping[int, Sequence[int]], macs: MacCount) -> int | None:
    if macs.total is None:
        return None
    selection = Selection(graph.classes, graph.spaces, kept)
    per_node = _predicted_node_macs(graph, selection, macs)
    return macs.total - sum(b - a for b, a in per_node.values())


def _search_ratio(
    graph: ChannelGraph,
    chooser: _Chooser,
    overrides: Mapping[int, float],
    macs: MacCount,
    target: float,
    notes: list[str],
) -> tuple[float, bool]:
    """The smallest uniform ratio whose predicted MAC reduction reaches ``target``."""
    if macs.total is None or macs.total == 0:
        raise ConfigError("target_mac_reduction needs MACs that can be counted; give the input shapes")

    def reduction(ratio: float) -> float:
        after = _predicted_total(graph, chooser.choose(ratio, overrides), macs)
        assert after is not None and macs.total
        return 1.0 - after / macs.total

    best = reduction(MAX_SEARCH_RATIO)
    if best < target:
        notes.append(
            f"target MAC reduction {100 * target:.1f}% is out of reach: pruning every prunable "
            f"group at ratio {MAX_SEARCH_RATIO} removes {100 * best:.1f}%; used that ratio"
        )
        return MAX_SEARCH_RATIO, False
    lo, hi = 0.0, MAX_SEARCH_RATIO
    for _ in range(40):
        mid = (lo + hi) / 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return hi, True


# --------------------------------------------------------------------------- report


def _finish(
    model: onnx.ModelProto,
    graph: ChannelGraph,
    kept: dict[int, list[int]],
    config: dict[str, Any],
    macs_before: MacCount,
    input_shapes: dict[str, list[int]] | None,
    *,
    ratio: float | None,
    target_met: bool | None,
    notes: list[str],
    ratios: Mapping[int, float],
    importance: Mapping[int, str],
) -> ChannelPruneReport:
    """Apply ``kept`` to the model and describe what happened."""
    selection = Selection(graph.classes, graph.spaces, kept)
    plan = plan_selection(graph, selection)
    params_before, bytes_before = count_parameters(model), model.ByteSize()
    groups = _group_reports(graph, selection, plan, macs_before, kept, ratios, importance)
    apply_plan(model, graph, plan)
    modified = not plan.empty
    macs_after = count_macs(model, input_shapes) if modified else macs_before
    predicted = _predicted_total(graph, kept, macs_before)
    if predicted is not None and macs_after.total is not None and predicted != macs_after.total:
        log.warning(
            "predicted MACs %s differ from counted MACs %s after pruning", predicted, macs_after.total
        )
    bn_fallbacks = sum(1 for g in groups if g.importance and g.importance.startswith("l1 ("))
    if bn_fallbacks:
        notes.append(
            f"{bn_fallbacks} group(s) have no BatchNormalization; they were ranked by L1 norm instead of bn_gamma"
        )
    return ChannelPruneReport(
        method="channels",
        config=config,
        modified=modified,
        params_before=params_before,
        params_after=count_parameters(model) if modified else params_before,
        bytes_before=bytes_before,
        bytes_after=model.ByteSize() if modified else bytes_before,
        notes=notes,
        groups=groups,
        ratio=ratio,
        macs_before=macs_before.total,
        macs_after=macs_after.total,
        target_met=target_met,
    )


def _group_reports(
    graph: ChannelGraph,
    selection: Selection,
    plan: Plan,
    macs: MacCount,
    kept: Mapping[int, Sequence[int]],
    ratios: Mapping[int, float],
    importance: Mapping[int, str],
) -> list[GroupReport]:
    per_node = _predicted_node_macs(graph, selection, macs)
    node_roots: dict[int, set[int]] = {}
    for term in graph.mac_terms:
        spaces = list(layout_spaces(term.outputs)) + (list(layout_spaces(term.inputs)) if term.inputs else [])
        node_roots[term.node] = {graph.classes.find(s) for s in spaces}
    const_roots: dict[tuple[int, int], set[int]] = {}
    for edit in graph.edits:
        if isinstance(edit, SliceConst):
            roots = {graph.classes.find(s) for s in layout_spaces(edit.layout)}
            const_roots.setdefault((edit.node, edit.input), set()).update(roots)
    reports = []
    for group in graph.groups:
        root = group.root
        units_after = len(kept[root]) if root in kept else group.units
        after = [selection.length((Seg(s, 0, graph.spaces[s].size),)) for s in group.spaces]
        status = "skipped" if group.skip_reasons else ("pruned" if units_after < group.units else "unchanged")
        macs_b = sum(per_node[n][0] for n, roots in node_roots.items() if root in roots)
        macs_a = sum(per_node[n][1] for n, roots in node_roots.items() if root in roots)
        params_b = params_a = 0
        for key, roots in const_roots.items():
            if root in roots:
                value = graph.index.const(graph.index.nodes[key[0]].input[key[1]])
                size = 0 if value is None else value.size
                params_b += size
                params_a += plan.values[key].size if key in plan.values else size
        reports.append(
            GroupReport(
                id=group.id, producers=group.producers, nodes=group.nodes,
                channels_before=group.channels, channels_after=after,
                units_before=group.units, units_after=units_after, status=status,
                skip_reasons=list(group.skip_reasons), ratio=ratios.get(root), importance=importance.get(root),
                macs_before=macs_b, macs_after=macs_a, params_before=params_b, params_after=params_a,
            )
        )  # fmt: skip
    return reports
