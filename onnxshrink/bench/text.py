"""The terminal rendering of a bench payload (see :mod:`onnxshrink.bench.schema`)."""

from __future__ import annotations

from typing import Any

from onnxshrink.report import format_table, human_bytes, section

_DATA_WORDS = {
    "labelled": "labelled samples",
    "unlabelled": "unlabelled samples",
    "random": "RANDOM input batches",
}


def ms(x: float | None) -> str:
    """Latency with about three significant digits."""
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def num(x: Any, fmt: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):  # "inf" from Fidelity.to_json
        return x
    return format(x, fmt)


def gate_value(gate: dict[str, Any]) -> tuple[str, str]:
    """(measured value, threshold) as text, in the units of the gate."""
    name, value, threshold = gate["name"], gate["value"], gate["threshold"]
    if name == "min_speedup":
        return (num(value, ".2f") + "x" if value is not None else "n/a"), f">= {threshold:g}x"
    if name == "max_drop":
        return (num(value, ".2f") + " pts" if value is not None else "n/a"), f"<= {threshold:g} pts"
    if name == "min_agreement":
        return (pct(value, 2) if value is not None else "n/a"), f">= {100 * threshold:g}%"
    return (num(value, ".3f") + " MB" if value is not None else "n/a"), f"<= {threshold:g} MB"


def memory_text(memory: dict[str, Any] | None) -> str:
    if memory is None:
        return "-"
    if memory.get("peak_rss_growth_bytes") is None:
        return "failed"
    return human_bytes(memory["peak_rss_growth_bytes"])


def memory_caption(models: list[dict[str, Any]]) -> str:
    """What the peak-memory column means, with onnxruntime's one-time cost when measured."""
    text = "peak RSS growth while creating and running the model's session (a child process per model"
    inits = [
        m["memory"]["runtime_init_bytes"]
        for m in models
        if m["memory"] and m["memory"].get("runtime_init_bytes")
    ]
    if inits:
        text += f"; onnxruntime's one-time cost per process, about {human_bytes(max(inits))}, is not included"
    return text + ")"


def describe_settings(payload: dict[str, Any]) -> list[str]:
    s = payload["settings"]
    threads = (
        f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}" if s["threads"] else "default threads"
    )
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in s["input_shapes"].items())
    options = ", ".join(f"{k}={v}" for k, v in s["provider_options"].items())
    data = s["data"]
    return [
        f"Provider  {s['provider']}"
        + (f" ({options})" if options else "")
        + f", {threads}, batch {s['batch']} ({shapes})",
        (
            f"Latency   {s['runs']} interleaved rounds (at least {s['min_runs']} and {s['min_time_s']:g} s) "
            f"after {s['warmup']} warm-up rounds"
        ),
        f"Data      {data['source']}: {data['samples']} {_DATA_WORDS.get(data['kind'], data['kind'])}",
    ]


def render(payload: dict[str, Any], *, top_ops: int = 5) -> str:
    models = payload["models"]
    lines = ["onnxshrink bench", *describe_settings(payload)]
    rows: list[tuple[str, ...]] = []
    for m in models:
        lat, vs = m["latency_ms"], m["vs_baseline"]
        if vs is None:
            ratio, speed = "baseline", "-"
        else:
            low, high = vs["latency_ratio_ci95"]
            ratio, speed = f"{vs['latency_ratio']:.3f} [{low:.3f}, {high:.3f}]", f"{vs['speedup']:.2f}x"
        rows.append((m["name"], ms(lat["p50"]), ms(lat["p90"]), ms(lat["p99"]), ms(lat["mean"]), ms(lat["min"]),
                     f"{m['throughput_per_s']:.0f}", ratio, speed, f"{m['session_create_ms']:.1f}", memory_text(m["memory"])))  # fmt: skip
    headers = [
        "model",
        "p50",
        "p90",
        "p99",
        "mean",
        "min",
        "rows/s",
        "ratio [95% CI]",
        "speed-up",
        "create",
        "peak mem",
    ]
    lines += [section("Latency (ms)"), format_table(rows, headers, align="lrrrrrrlrrr")]
    lines.append("ratio = p50 candidate / p50 baseline (paired bootstrap CI); create = session creation, ms")
    lines.append("peak mem = " + memory_caption(models))
    kind = payload["settings"]["data"]["kind"]
    rows = []
    for m in models:
        acc, fid = m["accuracy"] or {}, (m["vs_baseline"] or {}).get("fidelity") or {}
        rows.append((m["name"], human_bytes(m["size"]["total_bytes"]), pct(acc.get("top1"), 2), pct(acc.get("top5"), 2),
                     pct(fid.get("top1_agreement"), 2), num(fid.get("sqnr_db"), ".1f"), num(fid.get("cosine"), ".5f")))  # fmt: skip
    title = "Size and accuracy" + (" (fidelity on RANDOM inputs)" if kind == "random" else "")
    lines += [
        section(title),
        format_table(
            rows, ["model", "size", "top-1", "top-5", "agreement", "SQNR dB", "cosine"], align="lrrrrrr"
        ),
    ]
    lines += _profile_lines(models, payload["settings"]["provider"], top_ops)
    lines += _fusion_lines(models)
    if payload["gates"]:
        rows = []
        for g in payload["gates"]:
            value, threshold = gate_value(g)
            rows.append(
                (g["name"], g["model"], value, threshold, "PASS" if g["passed"] else "FAIL", g["detail"])
            )
        lines += [
            section("Gates"),
            format_table(rows, ["gate", "model", "measured", "threshold", "result", "what"], align="llrrll"),
        ]
        failed = sum(not g["passed"] for g in payload["gates"])
        total = len(payload["gates"])
        lines.append(
            f"\nResult: {'PASS' if not failed else 'FAIL'} ({total - failed} of {total} gates passed)"
        )
    if payload["notes"]:
        lines += [section("Notes"), *(f"- {n}" for n in payload["notes"])]
    return "\n".join(lines)


def _profile_lines(models: list[dict[str, Any]], provider: str, top_ops: int) -> list[str]:
    if not any(m["profile"] for m in models):
        return []
    rows = []
    for m in models:
        prof = m["profile"]
        if not prof:
            continue
        ops = prof["by_op_type"]
        top = ", ".join(
            f"{o['op_type']} {o['us_per_run']:.0f} ({100 * o['share']:.0f}%)" for o in ops[:top_ops]
        )
        if len(ops) > top_ops:
            top += f", +{len(ops) - top_ops} more"
        rows.append((m["name"], f"{prof['total_us_per_run']:.0f}", top))
    out = [
        section("Kernel time by op type (profiler, us per run)"),
        format_table(rows, ["model", "total", "op types"], align="lrl"),
    ]
    if provider != "CPUExecutionProvider":
        out.append("")
        for m in models:
            prof = m["profile"]
            if not prof:
                continue
            where = ", ".join(f"{p}: {k}" for p, k in prof["providers"].items())
            fallback = prof["cpu_fallback_nodes"]
            ops = sorted({f["op_type"] for f in fallback})
            out.append(
                f"{m['name']}: nodes per provider: {where}; on CPU: {len(fallback)}"
                + (f" ({', '.join(ops)})" if ops else "")
            )
    return out


def _fusion_lines(models: list[dict[str, Any]]) -> list[str]:
    if not any(m["fusion"] for m in models):
        return []
    out = [section("Fusion lint")]
    for m in models:
        fusion = m["fusion"]
        if fusion:
            summary = fusion.get("summary") if isinstance(fusion, dict) else None
            out.append(f"{m['name']}: {summary if summary else fusion}")
    return out
