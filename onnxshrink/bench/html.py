"""The self-contained HTML report of a bench payload: tables plus inline SVG charts.

No scripts, no external resources: the page can be archived as a CI artefact or mailed.
"""

from __future__ import annotations

import json
import os
import tempfile
from html import escape
from pathlib import Path
from typing import Any

from onnxshrink.bench import svg
from onnxshrink.bench.text import describe_settings, gate_value, memory_caption, memory_text, ms, num, pct
from onnxshrink.errors import ConfigError, ModelSaveError
from onnxshrink.report import human_bytes

#: Op types shown by name in the breakdown chart; the rest are summed as "other".
TOP_OPS = 8

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{padding:4px 9px;border-bottom:1px solid #eee}
th{background:#f4f4f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td{white-space:nowrap}
.pass{color:#176b2c;font-weight:600} .fail{color:#b3261e;font-weight:600}
.banner{padding:10px 14px;border-radius:6px;margin:14px 0;font-weight:600}
.banner.pass{background:#e6f4ea} .banner.fail{background:#fce8e6} .banner.none{background:#f1f3f4;color:#444}
.meta{color:#555;font-size:13px;margin:2px 0} li{font-size:13px;margin:3px 0} .caption{color:#555;font-size:12.5px;max-width:900px}
.warn{background:#fff4e5;border-left:4px solid #f28e2b;padding:6px 10px;font-size:13px;margin:6px 0} .warn ul{margin:4px 0;padding-left:20px}
svg.chart{max-width:100%;height:auto;display:block;margin:6px 0}
code{font-size:12px;background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="n"' if i in numeric else ""
            cells.append(f"<td{cls}>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ratio_cells(vs: dict[str, Any] | None) -> tuple[str, str]:
    if vs is None:
        return "baseline", "&ndash;"
    low, high = vs["latency_ratio_ci95"]
    return f"{vs['latency_ratio']:.3f} [{low:.3f}, {high:.3f}]", f"{vs['speedup']:.2f}&times;"


def _summary(models: list[dict[str, Any]]) -> str:
    rows = []
    for m in models:
        lat = m["latency_ms"]
        ratio, speed = _ratio_cells(m["vs_baseline"])
        rows.append([
            f"<b>{escape(m['name'])}</b>", ms(lat["p50"]), ms(lat["p90"]), ms(lat["p99"]), ms(lat["mean"]),
            ms(lat["min"]), f"{m['throughput_per_s']:.0f}", ratio, speed, f"{m['session_create_ms']:.1f}",
        ])  # fmt: skip
    latency = _table(["model", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "rows/s", "ratio [95% CI]",
                      "speed-up", "create ms"], rows, numeric=set(range(1, 10)))  # fmt: skip
    rows = []
    for m in models:
        acc, fid = m["accuracy"] or {}, (m["vs_baseline"] or {}).get("fidelity") or {}
        rows.append([
            f"<b>{escape(m['name'])}</b>", escape(human_bytes(m["size"]["total_bytes"])), escape(memory_text(m["memory"])),
            pct(acc.get("top1"), 2), pct(acc.get("top5"), 2), pct(fid.get("top1_agreement"), 2),
            escape(num(fid.get("sqnr_db"), ".1f")), escape(num(fid.get("cosine"), ".5f")),
        ])  # fmt: skip
    quality = _table(["model", "size", "peak mem", "top-1", "top-5", "agreement", "SQNR dB", "cosine"], rows,
                     numeric=set(range(1, 8)))  # fmt: skip
    return latency + quality


def _gates(payload: dict[str, Any]) -> str:
    gates = payload["gates"]
    if not gates:
        return '<div class="banner none">No gates were set.</div>'
    failed = sum(not g["passed"] for g in gates)
    banner = (
        f'<div class="banner {"fail" if failed else "pass"}">{"FAIL" if failed else "PASS"}: '
        f"{len(gates) - failed} of {len(gates)} gates passed</div>"
    )
    rows = []
    for g in gates:
        value, threshold = gate_value(g)
        verdict = '<span class="pass">PASS</span>' if g["passed"] else '<span class="fail">FAIL</span>'
        rows.append(
            [
                escape(g["name"]),
                escape(g["model"]),
                escape(value),
                escape(threshold),
                verdict,
                escape(g["detail"]),
            ]
        )
    return banner + _table(
        ["gate", "model", "measured", "threshold", "result", "what is measured"], rows, numeric={2, 3}
    )


def _scatter(payload: dict[str, Any]) -> str:
    models = payload["models"]
    if all(m["accuracy"] for m in models):
        points = [(m["name"], m["latency_ms"]["p50"], 100 * m["accuracy"]["top1"]) for m in models]
        y_label, what = "top-1 accuracy (%)", "top-1 accuracy on the labelled data"
    else:
        agreements = [
            ((m["vs_baseline"] or {}).get("fidelity") or {}).get("top1_agreement") for m in models[1:]
        ]
        if not models[1:] or any(a is None for a in agreements):
            return '<p class="caption">No accuracy or top-1 agreement to plot (no candidates, or outputs are not class scores).</p>'
        points = [(models[0]["name"], models[0]["latency_ms"]["p50"], 100.0)]
        points += [
            (m["name"], m["latency_ms"]["p50"], 100.0 * float(a or 0)) for m, a in zip(models[1:], agreements)
        ]
        kind = payload["settings"]["data"]["kind"]
        y_label = "top-1 agreement with baseline (%)"
        what = "top-1 agreement with the baseline (the baseline is 100% by definition) on " + (
            "RANDOM inputs: it says little about real data" if kind == "random" else "unlabelled data"
        )
    chart = svg.scatter(points, x_label="p50 latency (ms)", y_label=y_label, y_cap=100.0, y_min_span=2.0)
    return (
        chart
        + f'<p class="caption">Up and to the left is better. y: {escape(what)}; x: median latency per run.</p>'
    )


def _ops(payload: dict[str, Any]) -> str:
    models = [m for m in payload["models"] if m["profile"]]
    if not models:
        return '<p class="caption">The profiler pass was skipped.</p>'
    totals: dict[str, float] = {}
    for m in models:
        for o in m["profile"]["by_op_type"]:
            totals[o["op_type"]] = totals.get(o["op_type"], 0.0) + o["us_per_run"]
    named = sorted(totals, key=lambda k: -totals[k])[:TOP_OPS]
    rows = []
    for m in models:
        by = {o["op_type"]: o["us_per_run"] for o in m["profile"]["by_op_type"]}
        segments = [(k, by[k]) for k in named if k in by]
        other = sum(v for k, v in by.items() if k not in named)
        if other > 0:
            segments.append((svg.OTHER, other))
        rows.append((m["name"], segments))
    chart = svg.stacked_bars(rows, unit="kernel time per run (us)")
    runs = models[0]["profile"]["runs"]
    table_rows = []
    for m in models:
        for o in m["profile"]["by_op_type"]:
            table_rows.append(
                [
                    escape(m["name"]),
                    escape(o["op_type"]),
                    str(o["nodes"]),
                    f"{o['us_per_run']:.1f}",
                    f"{100 * o['share']:.1f}%",
                ]
            )
    caption = (
        f'<p class="caption">From onnxruntime\'s profiler in a separate pass ({runs} runs after a discarded first run, '
        "fresh sessions, so the latency figures above are not affected). Op types are those of the optimised graph "
        "(fused kernels appear under their own names). Kernel time excludes the per-run overhead of "
        "onnxruntime itself, so totals are below the measured latency.</p>"
    )
    details = (
        "<details><summary>Table</summary>"
        + _table(["model", "op type", "nodes", "us per run", "share"], table_rows, {2, 3, 4})
        + "</details>"
    )
    return chart + caption + details + _providers(payload)


def _providers(payload: dict[str, Any]) -> str:
    if payload["settings"]["provider"] == "CPUExecutionProvider":
        return ""
    parts = ["<h3>Nodes per execution provider</h3>"]
    for m in payload["models"]:
        prof = m["profile"]
        if not prof:
            continue
        where = ", ".join(f"{escape(p)}: {k}" for p, k in prof["providers"].items())
        fallback = prof["cpu_fallback_nodes"]
        parts.append(f"<p><b>{escape(m['name'])}</b>: {where}; {len(fallback)} on CPU</p>")
        if fallback:
            rows = [[escape(f["name"]), escape(f["op_type"])] for f in fallback]
            parts.append(
                "<details><summary>Nodes on CPU</summary>" + _table(["node", "op type"], rows) + "</details>"
            )
    return "".join(parts)


def _fusion(payload: dict[str, Any]) -> str:
    models = [m for m in payload["models"] if m["fusion"]]
    if not models:
        return '<p class="caption">Fusion lint not available in this run.</p>'
    rows = []
    for m in models:
        f = m["fusion"]
        unfused = ", ".join(f"{op} &times;{k}" for op, k in f.get("unfused_by_op_type", {}).items()) or "none"
        rows.append([
            f"<b>{escape(m['name'])}</b>", str(f.get("int8_kernels", "-")), pct(f.get("int8_mac_fraction")),
            unfused, str(f.get("remaining_quantize_linear", "-")), str(f.get("remaining_dequantize_linear", "-")),
            escape(str(f.get("summary", ""))),
        ])  # fmt: skip
    table = _table(
        ["model", "int8 kernels", "MACs in int8", "left in float", "Q left", "DQ left", "summary"],
        rows,
        {1, 2, 4, 5},
    )
    raw = "".join(
        f"<p><b>{escape(m['name'])}</b></p><pre>{escape(json.dumps(m['fusion'], indent=1)[:20000])}</pre>"
        for m in models
    )
    caption = (
        '<p class="caption">From onnxruntime\'s optimised graph for this provider: which quantized units became '
        "int8 kernels and which compute ops stayed in float between Q/DQ nodes (onnxshrink.fusion).</p>"
    )
    return table + caption + f"<details><summary>Details</summary>{raw}</details>"


def _notes(payload: dict[str, Any]) -> str:
    """Caveats of the run, shown first: they qualify every figure below."""
    notes = [n for n in payload["notes"] if not n.startswith("no --data")]  # that one has its own box
    if not notes:
        return ""
    return (
        '<div class="warn"><b>Notes</b><ul>' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul></div>"
    )


def render(payload: dict[str, Any]) -> str:
    models = payload["models"]
    kind = payload["settings"]["data"]["kind"]
    warn = (
        '<div class="warn">No <code>--data</code>: fidelity (agreement, SQNR, cosine) was measured on seeded RANDOM '
        "inputs and there is no accuracy. Give real samples for figures that mean something.</div>"
        if kind == "random"
        else ""
    )
    env = payload["environment"]
    names = ", ".join(escape(m["name"]) for m in models)
    sections = [
        f"<h1>onnxshrink bench: {names}</h1>",
        *(f'<p class="meta">{escape(line)}</p>' for line in describe_settings(payload)),
        (f'<p class="meta">onnxruntime {escape(env["onnxruntime"])}, {escape(env["cpu"] or "unknown CPU")} '
         f'({env["cpu_count"]} logical CPUs), {escape(payload["created"])}</p>'),
        warn,
        _notes(payload),
        "<h2>Gates</h2>", _gates(payload),
        "<h2>Summary</h2>", _summary(models),
        ('<p class="caption">Latencies are per run in milliseconds, measured with the models interleaved in one '
         "process. ratio = p50 candidate / p50 baseline with a 95% paired-bootstrap interval; speed-up = its "
         "inverse. create = session creation time (one measurement); size = model file plus external data; "
         f"peak mem = {escape(memory_caption(models))}.</p>"),
        "<h2>Latency distribution</h2>",
        svg.box_plot([(m["name"], m["latency_ms"]["samples_ms"]) for m in models]),
        (f'<p class="caption">Each dot is one timed run (at most {svg.MAX_DOTS} drawn per model). Box: 25th to 75th percentile; thick line: median; '
         "whiskers: 1st and 99th percentiles. The axis is logarithmic when the slowest run is over 4&times; the "
         "fastest.</p>"),
        "<h2>Accuracy vs latency</h2>", _scatter(payload),
        "<h2>Time by op type</h2>", _ops(payload),
        "<h2>Fusion lint</h2>", _fusion(payload),
    ]  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>onnxshrink bench: {names}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnxshrink-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(payload: dict[str, Any], folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.html`` and ``bench.json`` into ``folder`` (created if needed), atomically."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--report {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = {"html": out / "report.html", "json": out / "bench.json"}
        _write_atomic(paths["json"], json.dumps(payload, indent=2) + "\n")
        _write_atomic(paths["html"], render(payload))
    except OSError as exc:
        raise ModelSaveError(f"cannot write the report: {exc.strerror or exc}", path=out) from None
    return paths
