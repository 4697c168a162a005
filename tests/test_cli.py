"""The command line, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CANARY, SAMPLES, make_external, tree_bytes, write_model
from onnxshrink.cli import cli, main
from onnxshrink.errors import EXIT_BAD_INPUT, EXIT_GATE, EXIT_USAGE


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "inspect" in result.output and "shrink" in result.output
    assert "Exit codes" in result.output
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("onnxshrink ")


@pytest.mark.parametrize("name", ["plain_cnn", "resnet_mini", "mobilenet_mini"])
def test_inspect_json_on_sample_models(name, capsys):
    code, out, err = run_main(["inspect", str(SAMPLES / f"{name}.onnx"), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "onnxshrink.inspect/1"
    assert doc["inputs"][0]["name"] == "input" and doc["inputs"][0]["shape"] == ["batch", 1, 28, 28]
    assert doc["outputs"][0]["name"] == "logits"
    assert doc["parameters"] > 10_000 and doc["macs"]["total"] > 1_000_000
    assert doc["macs"]["flops"] == 2 * doc["macs"]["total"]
    assert doc["op_types"]["Conv"] >= 2
    assert doc["size"]["model_file_bytes"] == (SAMPLES / f"{name}.onnx").stat().st_size
    assert doc["opsets"]["ai.onnx"] >= 13


def test_inspect_table_and_shape_override(capsys):
    code, out, _ = run_main(["inspect", str(SAMPLES / "plain_cnn.onnx"), "--shape", "input=4x1x28x28"], capsys)
    assert code == 0
    assert "MACs" in out and "input=4x1x28x28" in out and "Conv" in out


def test_inspect_mac_count_scales_with_batch(capsys):
    one = json.loads(run_main(["inspect", str(SAMPLES / "resnet_mini.onnx"), "--json"], capsys)[1])
    four = json.loads(run_main(["inspect", str(SAMPLES / "resnet_mini.onnx"), "--json", "--shape", "input=4x1x28x28"], capsys)[1])
    assert four["macs"]["total"] == 4 * one["macs"]["total"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["inspect", "/nonexistent/model.onnx"], EXIT_BAD_INPUT, "model file not found"),
        (["inspect", "/dev/null"], EXIT_BAD_INPUT, "not a regular file"),
        (["inspect", str(SAMPLES / "plain_cnn.onnx"), "--shape", "nope=1x2"], EXIT_USAGE, "unknown input"),
        (["inspect", str(SAMPLES / "plain_cnn.onnx"), "--bogus"], EXIT_USAGE, "No such option"),
        (["shrink", str(SAMPLES / "plain_cnn.onnx"), "-o", "/tmp/x.onnx"], EXIT_USAGE, "--calib"),
        (["frobnicate"], EXIT_USAGE, "No such command"),
    ],
)
def test_errors_are_one_line_with_exit_codes(args, code, message, capsys):
    got, out, err = run_main(args, capsys)
    assert got == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxshrink: error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_unsafe_external_data_via_subprocess(tmp_path, small_model, canary):
    folder = tmp_path / "model_dir"
    folder.mkdir()
    make_external(small_model.graph.initializer[0], "../outside/secret.bin")
    model = write_model(small_model, folder / "model.onnx")
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["inspect", str(model)], ["shrink", str(model), "-o", str(out / "o.onnx"), "--calib", "random"]):
        proc = subprocess.run([sys.executable, "-m", "onnxshrink", *argv], capture_output=True, timeout=120)
        assert proc.returncode == EXIT_BAD_INPUT
        err = proc.stderr.decode()
        assert err.count("\n") == 1 and f"onnxshrink: error: {model}: " in err and "outside the model folder" in err
        assert CANARY not in proc.stdout + proc.stderr
    assert list(out.iterdir()) == []
    assert CANARY not in tree_bytes(folder)


def test_traceback_flag_shows_the_trace(capsys):
    code, _, err = run_main(["--traceback", "inspect", "/nonexistent.onnx"], capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" in err


def test_shrink_json_report(tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    code, stdout, err = run_main(
        ["shrink", str(SAMPLES / "resnet_mini.onnx"), "-o", str(out), "--calib", str(SAMPLES / "digits_calib.npz"), "--json"], capsys
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["schema"] == "onnxshrink.shrink/1"
    assert doc["output"] == str(out) and out.exists()
    assert doc["size"]["after_bytes"] < doc["size"]["before_bytes"] / 2
    int8 = doc["int8"]
    assert int8["target_met"] and int8["fidelity"]["top1_agreement"] >= 0.99
    assert int8["fusion"]["int8_mac_fraction"] > 0.95
    assert int8["calibration_samples"] + int8["evaluation_samples"] == 500
    assert doc["latency"]["ratio"] > 0 and doc["conversion"]["peak_rss_mb"] > 0
    assert isinstance(int8["fp32_nodes"], list)


def test_shrink_gate_failure_writes_the_model_and_exits_3(tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    code, _, err = run_main(
        ["shrink", str(SAMPLES / "plain_cnn.onnx"), "-o", str(out), "--calib", str(SAMPLES / "digits_calib.npz"),
         "--min-sqnr", "200", "--no-timing"],
        capsys,
    )
    assert code == EXIT_GATE
    assert out.exists()
    assert err.strip().splitlines()[-1].startswith(f"onnxshrink: error: {out}: accuracy target")


def test_shrink_never_overwrites_the_input(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes((SAMPLES / "plain_cnn.onnx").read_bytes())
    before = src.read_bytes()
    code, _, err = run_main(["shrink", str(src), "-o", str(src), "--calib", "random", "--no-timing"], capsys)
    assert code == EXIT_BAD_INPUT and "overwrite the input" in err
    assert src.read_bytes() == before


def test_shrink_with_bad_calibration_data(tmp_path, capsys):
    bad = tmp_path / "calib.npz"
    np.savez(bad, wrong_name=np.zeros((4, 1, 28, 28), np.float32))
    code, _, err = run_main(["shrink", str(SAMPLES / "plain_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib", str(bad)], capsys)
    assert code == EXIT_BAD_INPUT
    assert f"{bad}: has no array for model input(s) ['input']" in err
    assert not (tmp_path / "o.onnx").exists()


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "onnxshrink"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([str(exe), "inspect", str(SAMPLES / "plain_cnn.onnx")], capture_output=True, text=True, timeout=60, env={**os.environ})
    assert proc.returncode == 0 and "Parameters" in proc.stdout


def test_shrink_prunes_channels_then_quantizes(tmp_path, capsys):
    out = tmp_path / "pruned.int8.onnx"
    code, stdout, err = run_main(
        ["shrink", str(SAMPLES / "resnet_mini.onnx"), "-o", str(out), "--calib", str(SAMPLES / "digits_calib.npz"),
         "--prune-channels", "0.5", "--no-timing", "--json"],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["steps"][0] == "prune.channels" and doc["steps"][-1] == "quantize.int8"
    assert doc["macs"]["after"] < 0.5 * doc["macs"]["before"]
    assert doc["parameters"]["after"] < 0.5 * doc["parameters"]["before"]
    assert doc["pruning"][0]["groups"] and doc["fidelity"]["samples"] == 100
    import onnx

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_magnitude_zeros_survive_int8(tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "sparse.int8.onnx"
    code, stdout, err = run_main(
        ["shrink", str(SAMPLES / "plain_cnn.onnx"), "-o", str(out), "--calib", str(SAMPLES / "digits_calib.npz"),
         "--prune-magnitude", "0.5", "--no-timing", "--json"],
        capsys,
    )
    assert code == 0, err
    assert "no speed-up" in err
    doc = json.loads(stdout)
    layers = doc["magnitude_sensitivity"]
    assert len(layers) >= 4 and all(0 < x["fidelity"]["sqnr_db"] for x in layers)
    assert doc["fidelity"]["top1_agreement"] >= 0.97
    model = onnx.load(str(out))
    int8_weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")]
    zeros = sum(int((w == 0).sum()) for w in int8_weights)
    total = sum(w.size for w in int8_weights)
    assert zeros / total > 0.4, zeros / total


def test_prune_only_without_data_reports_random_fidelity(tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    code, stdout, err = run_main(
        ["shrink", str(SAMPLES / "plain_cnn.onnx"), "-o", str(out), "--quantize", "none", "--prune-channels", "0.25", "--no-timing", "--json"],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["fidelity_on_random_inputs"] is True and doc["int8"] is None
    assert "random inputs" in err


def test_model_that_cannot_run_its_data_is_a_one_line_error(tmp_path, capsys):
    """onnxruntime's own run-time failures become exit code 1, not an internal error."""
    import onnx
    from onnx import TensorProto, helper

    # Reshape to a fixed 7 elements: any real input size makes onnxruntime fail at run time.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])],
        [onnx.numpy_helper.from_array(np.array([7], np.int64), "shape")],
    )
    model = tmp_path / "m.onnx"
    model.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    code, _, err = run_main(["shrink", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", "random", "--no-timing"], capsys)
    assert code == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert [ln for ln in lines if not ln.startswith("onnxshrink: warning:")] == [lines[-1]]
    assert lines[-1].startswith(f"onnxshrink: error: {model}: onnxruntime failed to run the model")
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_leaves_the_working_directory_clean(tmp_path, monkeypatch, capsys):
    """Shape inference that cannot finish (an op from an unknown domain before a Conv) must
    not leave onnxruntime's ``sym_shape_infer_temp.onnx`` and data files in the cwd."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Mystery", ["x"], ["y"], domain="com.example"),
            helper.make_node("Conv", ["y", "w"], ["z"], pads=[1, 1, 1, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4, "h", "w"])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "models" / "mystery.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == 2
    assert sorted(os.listdir(work)) == []
    assert sorted(os.listdir(path.parent)) == ["mystery.onnx"]


@pytest.mark.parametrize("name", ["timeout-stats.py-_symbolic_infer", "timeout-stats.py-_symbolic_infer-2"])
def test_symbolic_shape_inference_cannot_loop_forever(name, capsys):
    """Fuzzer-found graphs on which onnxruntime's symbolic inference repeated its pass forever."""
    path = SAMPLES.parent / "fuzz" / "crashes" / "hangs" / f"{name}.onnx"
    result = subprocess.run([sys.executable, "-m", "onnxshrink", "inspect", "--json", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["shrink", "--calib", "random", "--no-timing", "-o", "{out}"], ["bench"]])
def test_a_model_that_crashes_onnxruntime_is_refused_in_one_line(tmp_path, command):
    """Fuzzer-found: onnxruntime 1.32 segfaults creating a session for this 170-byte model
    (opset-23 LayerNormalization whose scale is a graph input)."""
    model = SAMPLES.parent / "tests" / "data" / "ort_segfault_layernorm.onnx"
    args = [a.format(out=tmp_path / "out.onnx") for a in command]
    result = subprocess.run([sys.executable, "-m", "onnxshrink", args[0], str(model), *args[1:]], capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("onnxshrink: error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and "onnxruntime crashes (SIGSEGV)" in errors[0] and str(model) in errors[0]
    assert not (tmp_path / "out.onnx").exists()


def test_shape_inference_data_propagation_is_memory_bounded(tmp_path):
    """Fuzzer-found: onnx's shape inference with data propagation built this model's Range/Loop
    tensors in memory (24 GB RSS, killed by the OOM killer); it now runs under the memory bound
    and gives up on shapes instead."""
    model = SAMPLES.parent / "tests" / "data" / "onnx_data_prop_oom.onnx"
    env = {**os.environ, "ONNXSHRINK_MAX_MEMORY": "512M"}
    code = (
        "import sys; from onnxshrink.cli import main; rc = main(['inspect', sys.argv[1]]); "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr); sys.exit(rc)"
    )
    import resource

    def cap() -> None:  # a regression must fail here, not exhaust the machine
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    result = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=120, env=env, preexec_fn=cap)
    assert result.returncode == 0, result.stderr
    assert "Loop" in result.stdout
    peak_kib = int(result.stderr.split("VmHWM:")[1].split()[0])
    assert peak_kib < 1536 * 1024, f"peak {peak_kib} KiB: the bound did not stop shape inference"


def test_distill_refuses_a_teacher_that_crashes_onnxruntime(tmp_path):
    model = SAMPLES.parent / "tests" / "data" / "ort_segfault_layernorm.onnx"
    args = ["distill", "--teacher", str(model), "--student", str(SAMPLES / "resnet_mini.onnx"),
            "--data", str(SAMPLES / "digits_calib.npz"), "-o", str(tmp_path / "out.onnx")]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "onnxshrink", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [f"onnxshrink: error: {model}: onnxruntime crashes (SIGSEGV) when it loads or runs this model (tried in a child process); it cannot be processed"]
