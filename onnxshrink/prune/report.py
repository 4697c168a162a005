"""What a pruning pass did: per-layer or per-group figures, totals, JSON and a text table.

Reports are plain data. ``to_json()`` gives a dict with a ``schema`` key (stable field
names; figures that could not be computed are null) and ``render()`` a fixed-width text
summary for people. Neither computes anything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from onnxshrink.prune._layout import SkipReason
from onnxshrink.report import format_table, human_bytes, human_count, section

#: Version of the JSON layout of pruning reports.
PRUNE_SCHEMA = "onnxshrink.prune/1"

#: Said in every magnitude report, because users expect otherwise (sparseml#1529).
UNSTRUCTURED_NOTE = (
    "ONNX Runtime runs unstructured zeros at dense speed: magnitude pruning makes the model "
    "compress better (gzip), not faster or smaller on disk. Use channel pruning for speed."
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _change(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "-"
    if before == 0:
        return f"{human_count(before)} -> {human_count(after)}"
    return f"{human_count(before)} -> {human_count(after)} ({100 * (after - before) / before:+.1f}%)"


@dataclass
class PruneReport:
    """Figures common to every pruning pass.

    Attributes:
        method: ``"magnitude"`` or ``"channels"``.
        config: the configuration used, as a dict.
        modified: whether the model was changed.
        params_before / params_after: elements of all non-integer tensors.
        bytes_before / bytes_after: size of the serialized model.
        notes: things the user should know (unreachable targets, fallbacks, ...).
    """

    method: str
    config: dict[str, Any]
    modified: bool
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    notes: list[str] = field(default_factory=list)

    def _common_json(self) -> dict[str, Any]:
        return {
            "schema": PRUNE_SCHEMA,
            "method": self.method,
            "config": self.config,
            "modified": self.modified,
            "parameters": {"before": self.params_before, "after": self.params_after},
            "serialized_bytes": {"before": self.bytes_before, "after": self.bytes_after},
            "notes": list(self.notes),
        }

    def to_json(self) -> dict[str, Any]:
        return self._common_json()

    def render(self) -> str:
        return "\n".join(self._common_lines())

    def _common_lines(self) -> list[str]:
        return [
            f"Params     {_change(self.params_before, self.params_after)}",
            f"Size       {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)} serialized",
        ]


# --------------------------------------------------------------------------- magnitude


@dataclass
class LayerSparsity:
    """One weight tensor seen by magnitude pruning.

    Attributes:
        nodes: the nodes that use the weight (usually one).
        op_type: their op type.
        weight: the initializer's name.
        params: its number of elements.
        sparsity_before / sparsity: fraction of exact zeros before and after.
        skipped: why the weight was left as it was, or None if it was pruned.
    """

    nodes: list[str]
    op_type: str
    weight: str
    params: int
    sparsity_before: float
    sparsity: float
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "op_type": self.op_type,
            "weight": self.weight,
            "params": self.params,
            "sparsity_before": self.sparsity_before,
            "sparsity": self.sparsity,
            "skipped": self.skipped,
        }


@dataclass
class MagnitudePruneReport(PruneReport):
    """Result of :func:`onnxshrink.prune.prune_magnitude`.

    Attributes:
        layers: every eligible weight, pruned or skipped, in graph order.
        sparsity: zeros over the elements of the pruned weights.
        weight_sparsity: zeros over the elements of every eligible weight (skipped included).
        threshold: the magnitude below which weights were zeroed (for ``scope="global"``
            and ``threshold``; None for per-layer sparsity, where each layer has its own).
        gzip_before / gzip_after: gzip-compressed size of the serialized model.
    """

    layers: list[LayerSparsity] = field(default_factory=list)
    sparsity: float = 0.0
    weight_sparsity: float = 0.0
    threshold: float | None = None
    gzip_before: int = 0
    gzip_after: int = 0

    def to_json(self) -> dict[str, Any]:
        out = self._common_json()
        out.update(
            {
                "sparsity": self.sparsity,
                "weight_sparsity": self.weight_sparsity,
                "threshold": self.threshold,
                "gzip_bytes": {"before": self.gzip_before, "after": self.gzip_after},
                "layers": [layer.to_json() for layer in self.layers],
            }
        )
        return out

    def render(self) -> str:
        pruned = sum(1 for layer in self.layers if layer.skipped is None)
        cfg = self.config
        what = (
            f"sparsity {cfg.get('sparsity')} ({cfg.get('scope')} scope)"
            if cfg.get("sparsity") is not None
            else f"threshold {cfg.get('threshold')}"
        )
        lines = [
            f"Magnitude pruning: {what}; {pruned} of {len(self.layers)} weighted layers pruned",
            f"Sparsity   {_pct(self.sparsity)} of the pruned weights, {_pct(self.weight_sparsity)} of all eligible weights",
            *self._common_lines(),
            f"gzip       {human_bytes(self.gzip_before)} -> {human_bytes(self.gzip_after)}",
        ]
        rows = [
            (
                ", ".join(layer.nodes),
                layer.op_type,
                layer.weight,
                layer.params,
                _pct(layer.sparsity_before),
                _pct(layer.sparsity),
                layer.skipped or "",
            )
            for layer in self.layers
        ]
        lines += [
            section("Layers"),
            format_table(
                rows, ["node", "op", "weight", "params", "before", "after", "skipped"], align="lllrrrl"
            ),
        ]
        lines += ["", *(f"Note: {n}" for n in self.notes)]
        return "\n".join(lines)


# --------------------------------------------------------------------------- channels


@dataclass
class GroupReport:
    """One channel group: what was removed, or why nothing was.

    MACs and parameters are those of the nodes and constants the group touches (a Conv
    between two groups counts in both), before and after the whole pruning.
    """

    id: str
    producers: list[str]
    nodes: list[str]
    channels_before: list[int]
    channels_after: list[int]
    units_before: int
    units_after: int
    status: str  # "pruned", "unchanged" or "skipped"
    skip_reasons: list[SkipReason] = field(default_factory=list)
    ratio: float | None = None
    importance: str | None = None
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "producers": self.producers,
            "nodes": self.nodes,
            "channels": {"before": self.channels_before, "after": self.channels_after},
            "units": {"before": self.units_before, "after": self.units_after},
            "ratio": self.ratio,
            "importance": self.importance,
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "parameters": {"before": self.params_before, "after": self.params_after},
            "skip_reasons": [{"kind": r.kind, "detail": r.detail} for r in self.skip_reasons],
        }


@dataclass
class ChannelPruneReport(PruneReport):
    """Result of :func:`onnxshrink.prune.prune_channels`.

    Attributes:
        groups: every channel group, pruned, unchanged or skipped.
        ratio: the uniform ratio applied (found by bisection for a MAC target).
        macs_before / macs_after: from :func:`onnxshrink.stats.count_macs` (None when the
            shapes are not fully known).
        target_met: for ``target_mac_reduction``, whether the target was reached.
    """

    groups: list[GroupReport] = field(default_factory=list)
    ratio: float | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    target_met: bool | None = None

    @property
    def skip_tally(self) -> Counter[str]:
        """How many skipped groups each kind of reason (the first one given) accounts for."""
        return Counter(
            g.skip_reasons[0].kind for g in self.groups if g.status == "skipped" and g.skip_reasons
        )

    def count(self, status: str) -> int:
        return sum(1 for g in self.groups if g.status == status)

    def to_json(self) -> dict[str, Any]:
        out = self._common_json()
        out.update(
            {
                "ratio": self.ratio,
                "target_met": self.target_met,
                "macs": {"before": self.macs_before, "after": self.macs_after},
                "groups_summary": {s: self.count(s) for s in ("pruned", "unchanged", "skipped")},
                "skip_reasons": dict(self.skip_tally.most_common()),
                "groups": [g.to_json() for g in self.groups],
            }
        )
        return out

    def render(self, *, all_groups: bool = True) -> str:
        cfg = self.config
        how = f"ratio {self.ratio:.3f}" if self.ratio is not None else "given channels"
        if cfg.get("target_mac_reduction") is not None:
            how += f" (for a {100 * cfg['target_mac_reduction']:.0f}% MAC reduction: {'met' if self.target_met else 'NOT met'})"
        lines = [
            f"Channel pruning: {how}, importance {cfg.get('importance', '-')}",
            f"Groups     {self.count('pruned')} pruned, {self.count('unchanged')} unchanged, {self.count('skipped')} skipped",
            f"MACs       {_change(self.macs_before, self.macs_after)}",
            *self._common_lines(),
        ]
        tally = self.skip_tally
        if tally:
            lines.append("Skipped    " + ", ".join(f"{kind} x{n}" for kind, n in tally.most_common()))
        rows = []
        for g in self.groups:
            if not all_groups and g.status != "pruned":
                continue
            first = g.producers[0] + (f" (+{len(g.producers) - 1})" if len(g.producers) > 1 else "")
            chans = f"{g.channels_before[0]} -> {g.channels_after[0]}"
            note = g.skip_reasons[0].detail if g.skip_reasons else ""
            rows.append(
                (g.id, first, chans, human_count(g.macs_before), human_count(g.macs_after), g.status, note)
            )
        lines += [
            section("Groups"),
            format_table(
                rows, ["group", "producers", "channels", "MACs", "after", "status", "reason"], align="llrrrll"
            ),
        ]
        if self.notes:
            lines += ["", *(f"Note: {n}" for n in self.notes)]
        return "\n".join(lines)
