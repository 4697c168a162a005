"""Recipes: files, validation, shrink flags -> recipe, `onnxshrink run`, byte-identical reruns."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import yaml

from conftest import REPO, SAMPLES
from onnxshrink import __version__
from onnxshrink.cli import main
from onnxshrink.errors import EXIT_OK, EXIT_USAGE, ConfigError
from onnxshrink.recipe import STEP_TYPES, Recipe, dumps, load_recipe, run_recipe, save_recipe

EXAMPLES = sorted((REPO / "examples" / "recipes").glob("*.*"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_recipes_validate_run_and_reproduce_bytes(example, tmp_path, capsys):
    recipe = load_recipe(example)
    if any(s.type == "distill" for s in recipe.steps):
        pytest.importorskip("torch")
    code, out, err = cli(["recipe", "validate", str(example)], capsys)
    assert code == EXIT_OK, err
    assert out.startswith(f"{example}: valid (version 1): ")
    hashes = []
    for i in range(2):
        out_path = tmp_path / f"out{i}.onnx"
        run_recipe(recipe, SAMPLES / "resnet_mini.onnx", out_path, measure=False)
        hashes.append(sha(out_path))
    assert hashes[0] == hashes[1], f"{example.name}: reruns differ"
    meta = metadata(tmp_path / "out0.onnx")
    assert meta["onnxshrink.version"] == __version__
    assert meta["onnxshrink.onnxruntime"] == onnxruntime.__version__
    assert meta["onnxshrink.input_sha256"] == sha(SAMPLES / "resnet_mini.onnx")
    assert json.loads(meta["onnxshrink.recipe"]) == recipe.to_dict(paths=False)
    assert "calibration" not in json.loads(meta["onnxshrink.recipe"])["data"]  # no paths in the model


def test_run_command_with_bench_step(tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    code, stdout, err = cli(["run", str(REPO / "examples/recipes/int8.yaml"), str(SAMPLES / "plain_cnn.onnx"), "-o", str(out), "--json"], capsys)
    assert code == EXIT_OK, err
    doc = json.loads(stdout)
    assert doc["steps"] == ["quantize.int8"] and doc["latency"]["rounds"] >= 3
    assert doc["recipe"]["steps"][0]["type"] == "quantize.int8" and doc["input_sha256"] == sha(SAMPLES / "plain_cnn.onnx")


def test_shrink_flags_compile_to_a_recipe_that_run_reproduces(tmp_path, capsys):
    model, calib = str(SAMPLES / "resnet_mini.onnx"), str(SAMPLES / "digits_calib.npz")
    flags = ["--calib", calib, "--prune-channels", "0.25", "--prune-round-to", "4", "--no-timing", "--calib-count", "200"]
    recipe_file = tmp_path / "r.yaml"
    code, out, err = cli(["shrink", model, *flags, "--dry-run", "--save-recipe", str(recipe_file)], capsys)
    assert code == EXIT_OK, err
    assert not list(tmp_path.glob("*.onnx"))  # dry run: nothing else written
    printed = yaml.safe_load(out)
    assert [s["type"] for s in printed["steps"]] == ["prune.channels", "quantize.int8"]
    assert printed["steps"][0]["ratio"] == 0.25 and printed["steps"][0]["round_to"] == 4
    assert printed["steps"][1]["max_calibration_samples"] == 200
    assert load_recipe(recipe_file).to_dict(paths=False) == Recipe.from_dict(printed, base_dir=Path.cwd()).to_dict(paths=False)
    assert load_recipe(recipe_file).data.calibration == str(Path(calib).resolve())
    code, _, err = cli(["shrink", model, *flags, "-o", str(tmp_path / "shrunk.onnx")], capsys)
    assert code == EXIT_OK, err
    code, _, err = cli(["run", str(recipe_file), model, "-o", str(tmp_path / "replayed.onnx")], capsys)
    assert code == EXIT_OK, err
    assert sha(tmp_path / "shrunk.onnx") == sha(tmp_path / "replayed.onnx")


def test_show_spells_out_every_option_and_round_trips(tmp_path, capsys):
    src = REPO / "examples/recipes/magnitude.json"
    code, out, _ = cli(["recipe", "show", str(src)], capsys)
    assert code == EXIT_OK
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    # Paths are shown relative to the recipe's folder; a copy there reads back the same.
    copy = src.parent / f".test-show-{id(out)}.yaml"
    copy.write_text(out)
    try:
        assert load_recipe(copy) == load_recipe(src)
    finally:
        copy.unlink()
    magnitude = yaml.safe_load(out)["steps"][1]
    assert magnitude["scope"] == "global" and magnitude["include_first_last"] is False and "threshold" in magnitude
    code, out, _ = cli(["recipe", "show", str(src), "--json"], capsys)
    assert json.loads(out)["steps"][0] == {"type": "fold", "min_opset": 13}
    code, out, _ = cli(["recipe", "steps"], capsys)
    assert all(f"{kind}:" in out for kind in STEP_TYPES) and "round_to" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nsteps: [{type: prune.channel, ratio: 0.5}]", "unknown step type 'prune.channel' (did you mean 'prune.channels'?)"),
        ("version: 1\nsteps: [{type: prune.channels, ratoi: 0.5}]", "unknown option 'ratoi' (did you mean 'ratio'?)"),
        ("version: 1\nsteps: [{type: quantize.int8, per_chanel: false}]", "unknown option 'per_chanel' (did you mean 'per_channel'?)"),
        ("version: 1\nstep: [{type: fold}]", "unknown key 'step' (did you mean 'steps'?)"),
        ("version: 1\ndata: {calibraton: x.npz}\nsteps: [{type: fold}]", "unknown option 'calibraton' (did you mean 'calibration'?)"),
        ("version: 1\nsteps: [{type: quantize.int8, per_channel: 'yes'}]", "option 'per_channel' must be true or false, not 'yes'"),
        ("version: 1\nsteps: [{type: prune.channels, ratio: 1.5}]", "ratio must be in [0, 1), not 1.5"),
        ("version: 1\nsteps: [{type: distill, epochs: many}]", "option 'epochs' must be an integer, not 'many'"),
        ("version: 1\nsteps: [{type: quantize.int8}, {type: prune.channels, ratio: 0.2}]", "'prune.channels' must come before quantize.int8"),
        ("version: 1\nsteps: [{type: bench}, {type: quantize.int8}]", "'bench' may appear once, as the last step"),
        ("version: 2\nsteps: [{type: fold}]", "recipe version 2 is newer than this onnxshrink reads (1)"),
        ("steps: [{type: fold}]", "missing 'version'"),
        ("version: 1\nsteps: [{type: fold}\n", "not valid YAML"),
    ],
)
def test_invalid_recipes_are_one_line_errors(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = cli(["recipe", "validate", str(path)], capsys)
    assert code == EXIT_USAGE and out == ""
    assert err.count("\n") == 1 and err.startswith("onnxshrink: error: ") and message in err, err
    with pytest.raises(ConfigError):
        load_recipe(path)


def test_json_and_yaml_are_the_same_recipe(tmp_path):
    recipe = load_recipe(REPO / "examples/recipes/prune_int8.yaml")
    for name in ("r.json", "r.yaml"):
        save_recipe(recipe, tmp_path / name)
        assert load_recipe(tmp_path / name) == recipe
    assert json.loads((tmp_path / "r.json").read_text())["data"]["calibration"].endswith("sample_models/digits_calib.npz")
    assert dumps(recipe).startswith("# onnxshrink recipe")


def test_missing_calibration_for_int8_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "q.yaml"
    path.write_text("version: 1\nsteps: [{type: quantize.int8}]\n")
    code, _, err = cli(["run", str(path), str(SAMPLES / "plain_cnn.onnx"), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == EXIT_USAGE and "--calib DATA is required" in err
    code, _, err = cli(["run", str(path), str(SAMPLES / "plain_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                        "--calib", str(SAMPLES / "digits_calib.npz")], capsys)  # fmt: skip
    assert code == EXIT_OK, err
