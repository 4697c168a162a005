#!/usr/bin/env python3
"""ONNX Runtime's own static int8 quantization of the benchmark zoo: the baseline
that onnxshrink's quantizer has to beat.

For every zoo model (fp32 ONNX written by bench/export_zoo.py):

(a) ``onnxruntime.quantization.shape_inference.quant_pre_process`` with defaults
    (ORT's recommended pre-processing: symbolic shape inference + ORT basic
    graph optimisation), then on the pre-processed model
(b) ``quantize_static`` with all defaults  -> variant ``ort_default``
    (QDQ format, per_channel=False, activations QInt8, weights QInt8, MinMax)
(c) ``quantize_static(quant_format=QDQ, activation_type=QUInt8,
    weight_type=QInt8, per_channel=True)``  -> variant ``ort_u8s8_pc``

both calibrated on the 32-sample set (``calib32.npz`` / ``calib32_299.npz``)
through a CalibrationDataReader fed one sample (batch 1) at a time.

Each conversion step runs in its own child process (a re-invocation of this
script) which reports its own wall time for the step (imports excluded) and its
peak RSS (VmHWM of the child's address space, from /proc/self/status; falls
back to getrusage(RUSAGE_SELF)), so the figures are not polluted by earlier
work in the parent.  By default the child forces every ORT session it creates
(calibration, shape inference) to 1 intra-op thread (``--conv-threads``) and
blocks the torch import that onnxruntime.tools performs whenever torch is
installed (``--allow-torch`` lifts that).

Then, in the parent:

* latency: fp32 and the int8 variants in ORT sessions created once
  (CPUExecutionProvider, 1 intra-op + 1 inter-op thread, sequential, ORT_ENABLE_ALL),
  batch 1, runs interleaved fp32, b, c, fp32, b, c, ... (``--warmup`` rounds
  untimed, then ``--rounds`` timed with time.perf_counter); reported: median
  latency per model and the median over rounds of the per-round ratio int8/fp32;
* agreement on 32 held-back inputs (``eval32.npz``, disjoint from the
  calibration sets): top-1 agreement with fp32 and SQNR of the logits
  10*log10(sum(ref^2) / sum((ref - q)^2)) over all 32 x classes values;
* Q/DQ fusion: each int8 model is loaded in a session with
  ``optimized_model_filepath`` (at ORT_ENABLE_ALL, and at ORT_ENABLE_EXTENDED
  for comparison); the saved graph is scanned for QuantizeLinear /
  DequantizeLinear nodes that ORT left unfused, and for the op types sitting
  between them (consumers of a surviving DQ, producers of a surviving Q).

Only onnx, onnxruntime and numpy are needed (no torch); quant_pre_process in
ORT 1.32 also needs sympy for its symbolic shape inference.

Usage::

    python bench/ort_baseline.py [--zoo /work/zoo] [--models a,b] [--rounds 30]
                                 [--json /work/zoo/ort_baseline.json]

A failure of one model / variant / step is recorded with its error and the run
goes on.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "squeezenet1_1",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "densenet121",
    "inception_v3",
    "convnext_tiny",
    "vgg16",
]

VARIANTS = {
    # name: quantize_static kwargs (besides model paths and the data reader)
    "ort_default": {},
    "ort_u8s8_pc": {"quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True},
}
VARIANT_DESC = {
    "ort_default": "quantize_static defaults: QDQ, per_channel=False, act QInt8, weight QInt8, MinMax",
    "ort_u8s8_pc": "QDQ, act QUInt8, weight QInt8, per_channel=True, MinMax",
}
RESULT_MARK = "@@ORT_BASELINE_RESULT "
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# --------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    """Peak RSS of this process' current address space in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return ru / 1024.0


def model_input(path: str):
    """(name, [dims]) of the first real graph input of an ONNX file."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name not in inits:
            dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
            return inp.name, dims
    raise ValueError(f"{path}: no graph input")


def data_path(zoo: str, stem: str, size: int) -> str:
    return os.path.join(zoo, f"{stem}.npz" if size == 224 else f"{stem}_{size}.npz")


def load_set(zoo: str, stem: str, size: int) -> np.ndarray:
    p = data_path(zoo, stem, size)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} missing: run bench/export_zoo.py first")
    with np.load(p) as z:
        return np.ascontiguousarray(z["input"], dtype=np.float32)


def cpu_info() -> dict:
    info = {"model_name": platform.processor() or "", "vnni": []}
    try:
        txt = open("/proc/cpuinfo").read()
        for line in txt.splitlines():
            if line.startswith("model name"):
                info["model_name"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["vnni"] = sorted(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags)
                info["avx512f"] = "avx512f" in flags
                info["avx2"] = "avx2" in flags
                break
    except OSError:
        pass
    info["logical_cpus"] = os.cpu_count()
    return info


# --------------------------------------------------------------------------- child worker


def _force_threads(n: int) -> None:
    """Make every onnxruntime.SessionOptions() created from now on use n intra-op threads."""
    import onnxruntime as ort
    import onnxruntime.quantization.quant_utils as qu

    base = ort.SessionOptions

    class _SO(base):  # type: ignore[misc,valid-type]
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.intra_op_num_threads = n
            self.inter_op_num_threads = 1

    ort.SessionOptions = _SO
    if getattr(qu, "SessionOptions", None) is base:
        qu.SessionOptions = _SO


def worker(spec: dict) -> dict:
    if spec.get("block_torch", True) and "torch" not in sys.modules:
        # onnxruntime/tools/__init__.py imports torch whenever it is installed
        # (pytorch_export_helpers), and quant_pre_process goes through
        # onnxruntime.tools; in a venv with torch that adds ~0.45 GiB RSS and
        # ~2 s that have nothing to do with quantization.  A None entry makes
        # importlib.util.find_spec("torch") return None, so ORT skips it.
        sys.modules["torch"] = None  # type: ignore[assignment]
    import onnxruntime as ort  # noqa: F401  (import cost excluded from timing)
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if spec.get("threads", 0) > 0:
        _force_threads(spec["threads"])
    rss0 = peak_rss_mb()
    out = {"rss_after_import_mb": round(rss0, 1)}
    t0 = time.perf_counter()
    if spec["op"] == "pre":
        quant_pre_process(spec["src"], spec["dst"])
    elif spec["op"] == "quant":
        name, dims = model_input(spec["src"])
        x = load_set(spec["zoo"], "calib32", int(dims[-1]))

        class Reader(q.CalibrationDataReader):
            def __init__(self):
                self.i = 0

            def get_next(self):
                if self.i >= len(x):
                    return None
                self.i += 1
                return {name: x[self.i - 1 : self.i]}

            def __len__(self):
                return len(x)

            def rewind(self):
                self.i = 0

        kw = {}
        for k, v in VARIANTS[spec["variant"]].items():
            if k == "quant_format":
                v = getattr(q.QuantFormat, v)
            elif k.endswith("_type"):
                v = getattr(q.QuantType, v)
            kw[k] = v
        q.quantize_static(spec["src"], spec["dst"], Reader(), **kw)
    else:
        raise ValueError(spec["op"])
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["size_mb"] = round(os.path.getsize(spec["dst"]) / 1e6, 2)
    return out


def worker_main(arg: str) -> int:
    spec = json.loads(arg)
    try:
        res = {"ok": True, **worker(spec)}
    except BaseException as e:  # noqa: BLE001
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


def run_step(spec: dict, timeout: float, log) -> dict:
    """Run one conversion step in a child process; return its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f}s"}
    wall = time.perf_counter() - t0
    res = None
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK) :])
    if res is None:
        tail = (p.stderr or p.stdout)[-2000:]
        res = {"ok": False, "error": f"child exited {p.returncode} without result: {tail}"}
    res["process_wall_s"] = round(wall, 3)
    if log is not None:
        log.write(f"==== {spec}\n--- stdout\n{p.stdout[-20000:]}\n--- stderr\n{p.stderr[-20000:]}\n")
        log.flush()
    return res


# --------------------------------------------------------------------------- measurement in the parent


def make_session(path: str, level=None, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def latency(sessions: dict, x: np.ndarray, warmup: int, rounds: int) -> dict:
    """Interleaved batch-1 latency. sessions: name -> (session, input name)."""
    names = list(sessions)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        # Rotate the order each round: a model always run right after the fp32 one would
        # always find the cache full of fp32 weights (measured: up to ~10% against it).
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            sess, iname = sessions[n]
            feed = {iname: x}
            t0 = time.perf_counter()
            sess.run(None, feed)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    res = {}
    ref = np.array(times[names[0]])
    for n in names:
        t = np.array(times[n])
        d = {"median_ms": round(float(np.median(t)) * 1e3, 3), "min_ms": round(float(t.min()) * 1e3, 3)}
        if n != names[0]:
            d["ratio_median_of_rounds"] = round(float(np.median(t / ref)), 4)
            d["ratio_of_medians"] = round(float(np.median(t) / np.median(ref)), 4)
        res[n] = d
    return res


def run_all(sess, iname: str, xs: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(None, {iname: xs[i : i + 1]})[0] for i in range(len(xs))], axis=0)


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - q.astype(np.float64)) ** 2))
    sig = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return 10.0 * np.log10(sig / noise)


def agreement(ref: np.ndarray, q: np.ndarray) -> dict:
    """top-1 agreement and SQNR of q vs ref, plus the same on logits centred per class.

    With random-init models and noise inputs the fp32 top-1 is often the same
    class for every input, so plain top-1 agreement says little; the centred
    variants (each model's mean logit over the 32 inputs subtracted) measure
    only the input-dependent part of the logits.
    """
    ref2 = ref.reshape(len(ref), -1).astype(np.float64)
    q2 = q.reshape(len(q), -1).astype(np.float64)
    per = [sqnr_db(ref2[i], q2[i]) for i in range(len(ref2))]
    rc = ref2 - ref2.mean(0, keepdims=True)
    qc = q2 - q2.mean(0, keepdims=True)
    return {
        "top1_agreement": round(float(np.mean(ref2.argmax(1) == q2.argmax(1))), 4),
        "sqnr_db": round(sqnr_db(ref2, q2), 2),
        "sqnr_db_min_sample": round(float(np.min(per)), 2),
        "top1_agreement_centered": round(float(np.mean(rc.argmax(1) == qc.argmax(1))), 4),
        "sqnr_db_centered": round(sqnr_db(rc, qc), 2),
        "nonfinite_outputs": int(np.sum(~np.isfinite(q2))),
    }


def qdq_report(model_path: str, level_name: str) -> dict:
    """Save ORT's optimised graph of an int8 model and describe surviving Q/DQ nodes."""
    import onnx
    import onnxruntime as ort

    level = getattr(ort.GraphOptimizationLevel, level_name)
    fd, opt_path = tempfile.mkstemp(suffix=".onnx", prefix="ortopt_")
    os.close(fd)
    try:
        make_session(model_path, level=level, optimized_path=opt_path)
        g = onnx.load(opt_path, load_external_data=False).graph
    finally:
        for p in (opt_path, opt_path + ".data"):
            if os.path.exists(p):
                os.remove(p)
    inits = {i.name for i in g.initializer}
    graph_in = {i.name for i in g.input} - inits
    graph_out = {o.name for o in g.output}
    producer = {}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            if i:
                consumers[i].append(n)

    def label(n) -> str:
        return n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"

    n_q = n_dq = n_dq_weight = 0
    between = {}  # id(node) -> label, for nodes consuming a surviving DQ or producing a surviving Q
    dq_consumers = collections.Counter()
    q_producers = collections.Counter()
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            n_dq += 1
            if n.input[0] in inits:
                n_dq_weight += 1
            for c in consumers[n.output[0]]:
                dq_consumers[label(c)] += 1
                if c.op_type not in QDQ_OPS:
                    between[id(c)] = label(c)
            if n.output[0] in graph_out:
                dq_consumers["<graph output>"] += 1
        elif n.op_type == "QuantizeLinear":
            n_q += 1
            src = n.input[0]
            if src in graph_in:
                p = "<graph input>"
            elif src in producer:
                p = label(producer[src])
                if producer[src].op_type not in QDQ_OPS:
                    between[id(producer[src])] = p
            else:
                p = "<initializer>"
            q_producers[p] += 1
    ops = collections.Counter(label(n) for n in g.node)
    return {
        "level": level_name,
        "nodes": len(g.node),
        "QuantizeLinear": n_q,
        "DequantizeLinear": n_dq,
        "DequantizeLinear_on_initializer": n_dq_weight,
        "dq_consumers": dict(dq_consumers.most_common()),
        "q_producers": dict(q_producers.most_common()),
        # distinct nodes (not edges) that take a surviving DQ output or feed a surviving Q
        "fp32_ops_between_qdq": dict(collections.Counter(between.values()).most_common()),
        "op_histogram": dict(ops.most_common()),
    }


def count_qdq(path: str) -> dict:
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    c = collections.Counter(n.op_type for n in g.node)
    return {"QuantizeLinear": c.get("QuantizeLinear", 0), "DequantizeLinear": c.get("DequantizeLinear", 0), "nodes": len(g.node)}


# --------------------------------------------------------------------------- driver


def bench_model(name: str, args, log) -> dict:
    zoo = args.zoo
    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    fp32 = os.path.join(zoo, f"{name}.onnx")
    rec: dict = {"model": name, "fp32_path": fp32, "variants": {}}
    if not os.path.exists(fp32):
        rec["error"] = f"{fp32} missing"
        return rec
    rec["fp32_size_mb"] = round(os.path.getsize(fp32) / 1e6, 2)
    iname, dims = model_input(fp32)
    size = int(dims[-1])
    rec["input"] = {"name": iname, "dims": dims}

    pre = os.path.join(work, f"{name}.pre.onnx")
    spec = {"op": "pre", "src": fp32, "dst": pre, "threads": args.conv_threads, "zoo": zoo, "block_torch": not args.allow_torch}
    print(f"[{name}] pre-process ...", flush=True)
    rec["preprocess"] = run_step(spec, args.conv_timeout, log)
    print(f"[{name}]   -> {short(rec['preprocess'])}", flush=True)
    src = pre if rec["preprocess"].get("ok") else None

    paths = {}
    for v in args.variants:
        vr: dict = {"desc": VARIANT_DESC[v]}
        rec["variants"][v] = vr
        if src is None:
            vr["error"] = "pre-processing failed"
            continue
        dst = os.path.join(work, f"{name}.{v}.onnx")
        spec = {"op": "quant", "variant": v, "src": src, "dst": dst, "threads": args.conv_threads, "zoo": zoo,
                "block_torch": not args.allow_torch}
        print(f"[{name}] quantize {v} ...", flush=True)
        vr["convert"] = run_step(spec, args.conv_timeout, log)
        print(f"[{name}]   -> {short(vr['convert'])}", flush=True)
        if vr["convert"].get("ok"):
            paths[v] = dst
            try:
                vr["qdq_inserted"] = count_qdq(dst)
            except Exception as e:  # noqa: BLE001
                vr["qdq_inserted"] = {"error": repr(e)}
        else:
            vr["error"] = "conversion failed: " + vr["convert"].get("error", "?")[:500]

    # sessions (created once), latency, agreement
    sessions = {}
    try:
        sessions["fp32"] = (make_session(fp32), iname)
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"fp32 session: {type(e).__name__}: {e}"
        return rec
    for v, p in paths.items():
        try:
            sessions[v] = (make_session(p), model_input(p)[0])
        except Exception as e:  # noqa: BLE001
            rec["variants"][v]["error"] = f"session: {type(e).__name__}: {e}"
    xs = load_set(zoo, "eval32", size)
    # smoke-run every session once; drop the ones that fail
    for v in list(sessions):
        try:
            sessions[v][0].run(None, {sessions[v][1]: xs[:1]})
        except Exception as e:  # noqa: BLE001
            if v == "fp32":
                rec["error"] = f"fp32 run: {type(e).__name__}: {e}"
                return rec
            rec["variants"][v]["error"] = f"run: {type(e).__name__}: {e}"
            del sessions[v]
    print(f"[{name}] latency {list(sessions)} warmup={args.warmup} rounds={args.rounds} ...", flush=True)
    try:
        lat = latency(sessions, xs[:1], args.warmup, args.rounds)
        rec["fp32_latency"] = lat["fp32"]
        for v in sessions:
            if v != "fp32":
                rec["variants"][v]["latency"] = lat[v]
    except Exception as e:  # noqa: BLE001
        rec["latency_error"] = f"{type(e).__name__}: {e}"
    ref = run_all(sessions["fp32"][0], iname, xs)
    r2 = ref.reshape(len(ref), -1)
    rec["fp32_logits"] = {
        "max_abs": float(np.max(np.abs(r2))),
        "std": float(np.std(r2)),
        "distinct_top1": int(len(set(r2.argmax(1).tolist()))),
        "distinct_top1_centered": int(len(set((r2 - r2.mean(0, keepdims=True)).argmax(1).tolist()))),
        "nonfinite": int(np.sum(~np.isfinite(r2))),
    }
    for v in sessions:
        if v == "fp32":
            continue
        try:
            rec["variants"][v]["agreement"] = agreement(ref, run_all(sessions[v][0], sessions[v][1], xs))
        except Exception as e:  # noqa: BLE001
            rec["variants"][v]["agreement"] = {"error": f"{type(e).__name__}: {e}"}
    sessions.clear()

    # what ORT leaves unfused
    for v, p in paths.items():
        for lvl in args.qdq_levels:
            key = f"qdq_after_{lvl}"
            try:
                rec["variants"][v][key] = qdq_report(p, lvl)
            except Exception as e:  # noqa: BLE001
                rec["variants"][v][key] = {"error": f"{type(e).__name__}: {e}"}
    if not args.keep:
        for p in [pre, *paths.values()]:
            if os.path.exists(p):
                os.remove(p)
    return rec


def short(r: dict) -> str:
    if not r.get("ok"):
        return "FAILED " + r.get("error", "?")[:300]
    return f"ok {r['seconds']:.1f}s peak {r['peak_rss_mb']:.0f} MiB ({r['size_mb']:.1f} MB)"


def fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def print_tables(results: list, variants: list) -> None:
    print()
    print("Latency (batch 1, 1 thread, ORT_ENABLE_ALL; ratio = median over rounds of int8/fp32)")
    hdr = f"{'model':<19} {'fp32 ms':>8}"
    for v in variants:
        hdr += f" | {v + ' ms':>15} {'ratio':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        line = f"{r['model']:<19} {fmt(r.get('fp32_latency', {}).get('median_ms'), '8.2f'):>8}"
        for v in variants:
            lat = r.get("variants", {}).get(v, {}).get("latency", {})
            line += f" | {fmt(lat.get('median_ms'), '15.2f'):>15} {fmt(lat.get('ratio_median_of_rounds'), '6.3f'):>6}"
        print(line)

    print()
    print("Conversion (each step in its own process; s = step wall time, MiB = peak RSS of that process)")
    hdr = f"{'model':<19} {'pre s':>6} {'pre MiB':>8}"
    for v in variants:
        hdr += f" | {v + ' s':>13} {'MiB':>6} {'MB':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        p = r.get("preprocess", {})
        line = f"{r['model']:<19} {fmt(p.get('seconds'), '6.1f'):>6} {fmt(p.get('peak_rss_mb'), '8.0f'):>8}"
        for v in variants:
            c = r.get("variants", {}).get(v, {}).get("convert", {})
            line += f" | {fmt(c.get('seconds'), '13.1f'):>13} {fmt(c.get('peak_rss_mb'), '6.0f'):>6} {fmt(c.get('size_mb'), '6.1f'):>6}"
        print(line)

    print()
    print("Agreement with fp32 on 32 held-back inputs: top-1 agreement, SQNR dB of logits;")
    print("  c-top1 / c-SQNR: same on logits centred per class (mean over the 32 inputs removed);")
    print("  #top1 / #ctop1: distinct fp32 top-1 classes among the 32 inputs, raw / centred")
    hdr = f"{'model':<19} {'fp32 max|y|':>11} {'#top1':>5} {'#ctop1':>6}"
    for v in variants:
        hdr += f" | {v + ' top1':>16} {'SQNR':>6} {'c-top1':>6} {'c-SQNR':>6}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        fl = r.get("fp32_logits", {})
        line = (f"{r['model']:<19} {fmt(fl.get('max_abs'), '11.3g'):>11} {fmt(fl.get('distinct_top1'), '5d'):>5}"
                f" {fmt(fl.get('distinct_top1_centered'), '6d'):>6}")
        for v in variants:
            a = r.get("variants", {}).get(v, {}).get("agreement", {})
            line += (f" | {fmt(a.get('top1_agreement'), '16.3f'):>16} {fmt(a.get('sqnr_db'), '6.1f'):>6}"
                     f" {fmt(a.get('top1_agreement_centered'), '6.3f'):>6} {fmt(a.get('sqnr_db_centered'), '6.1f'):>6}")
        print(line)

    for lvl_key in sorted({k for r in results for v in r.get("variants", {}).values() for k in v if k.startswith("qdq_after_")}):
        print()
        print(f"Unfused Q/DQ in ORT's optimised graph ({lvl_key[10:]}): Q/DQ count (of inserted) and fp32 op types between them")
        for r in results:
            for v in variants:
                vr = r.get("variants", {}).get(v, {})
                rep = vr.get(lvl_key)
                if rep is None:
                    continue
                ins = vr.get("qdq_inserted", {})
                if "error" in rep:
                    print(f"  {r['model']:<19} {v:<12} ERROR {rep['error'][:200]}")
                    continue
                btw = ", ".join(f"{k}x{n}" for k, n in rep["fp32_ops_between_qdq"].items()) or "-"
                print(
                    f"  {r['model']:<19} {v:<12} Q {rep['QuantizeLinear']:>3}/{ins.get('QuantizeLinear', '?'):<4}"
                    f" DQ {rep['DequantizeLinear']:>3}/{ins.get('DequantizeLinear', '?'):<4}"
                    f" (DQ on weights {rep['DequantizeLinear_on_initializer']})  between: {btw}"
                )

    errs = []
    for r in results:
        if r.get("error"):
            errs.append(f"  {r['model']}: {r['error']}")
        for v, vr in r.get("variants", {}).items():
            if vr.get("error"):
                errs.append(f"  {r['model']} / {v}: {vr['error'][:300]}")
    if errs:
        print()
        print("FAILURES")
        print("\n".join(errs))


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--_worker"]:
        return worker_main(argv[1])

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="/work/zoo", help="folder with <model>.onnx and calib32/eval32 .npz (default /work/zoo)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset (default: all 12)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (default 30)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed warm-up rounds (default 10)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--work", default=None, help="folder for pre-processed/quantized models (default <zoo>/ort_baseline)")
    ap.add_argument("--keep", action="store_true", help="keep the pre-processed and quantized models")
    ap.add_argument("--conv-threads", type=int, default=1,
                    help="intra-op threads for ORT sessions inside conversions (calibration); 0 = ORT default (default 1)")
    ap.add_argument("--allow-torch", action="store_true",
                    help="let conversion children import torch (onnxruntime.tools does so when torch is installed; "
                         "blocked by default so RSS/time are the same as in a torch-free venv)")
    ap.add_argument("--conv-timeout", type=float, default=3600.0, help="seconds allowed per conversion step")
    ap.add_argument("--qdq-levels", default="ORT_ENABLE_ALL,ORT_ENABLE_EXTENDED",
                    help="optimisation levels at which to inspect surviving Q/DQ nodes")
    ap.add_argument("--log", default=None, help="append child-process stdout/stderr here (default <work>/children.log)")
    args = ap.parse_args(argv)

    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}")
    args.qdq_levels = [v.strip() for v in args.qdq_levels.split(",") if v.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.work = args.work or os.path.join(args.zoo, "ort_baseline")
    os.makedirs(args.work, exist_ok=True)

    import onnx
    import onnxruntime as ort

    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "cpu": cpu_info(),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "conv_threads": args.conv_threads,
        "conv_block_torch": not args.allow_torch,
        "variants": {v: VARIANT_DESC[v] for v in args.variants},
    }
    print(f"onnxruntime {ort.__version__}  onnx {onnx.__version__}  numpy {np.__version__}  cpu {meta['cpu']}", flush=True)

    results = []
    log_path = args.log or os.path.join(args.work, "children.log")
    with open(log_path, "a") as log:
        for m in models:
            t0 = time.perf_counter()
            try:
                rec = bench_model(m, args, log)
            except Exception as e:  # noqa: BLE001
                rec = {"model": m, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            rec["bench_seconds"] = round(time.perf_counter() - t0, 1)
            results.append(rec)
            print(f"[{m}] done in {rec['bench_seconds']:.0f}s", flush=True)
            if args.json:  # write incrementally so a long run leaves partial results
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "results": results}, f, indent=1)

    print_tables(results, args.variants)
    if args.json:
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
