#!/usr/bin/env bash
# GPU check of `onnxshrink bench`: fp32 vs int8 on CUDA (and TensorRT when its libraries are
# present), with onnxruntime-gpu in a virtual environment of its own.
#
# Usage (from anywhere; the repository is found from this script's path):
#   bench/gpu_check.sh [OUT_DIR]            # default OUT_DIR: ${OUT:-/tmp/onnxshrink-gpu-check}
#
# What it does
#   1. checks that nvidia-smi sees a GPU;
#   2. creates a fresh venv WITHOUT system site-packages (so the CPU `onnxruntime` package of
#      the machine can never shadow or mix with onnxruntime-gpu: both install the same
#      `onnxruntime` module), installs onnxruntime-gpu (PyPI's onnxruntime-gpu is the CUDA 13
#      build: its `cuda` extra requires nvidia-cuda-runtime~=13.0), onnxshrink's other
#      dependencies, and onnxshrink itself with --no-deps; then refuses to go on if a CPU
#      `onnxruntime` distribution is present in that venv;
#   3. makes CUDA/cuDNN/TensorRT libraries that live in pip `nvidia-*`/`tensorrt*` packages of
#      the machine's own Python visible through LD_LIBRARY_PATH (libraries only; no Python
#      package is shared);
#   4. picks the sample model (MODEL, default sample_models/resnet_mini.onnx) and an int8
#      version of it (CANDIDATE; default sample_models/resnet_mini.int8.onnx if it exists,
#      else one made here with onnxruntime.quantization (quant_pre_process, then quantize_static:
#      QDQ, uint8 activations, int8 per-channel weights, 64 calibration samples);
#   5. runs `onnxshrink bench --provider cuda` (and `--provider tensorrt` if libnvinfer loads),
#      printing the tables and writing OUT_DIR/<provider>/report.html and bench.json.
#
# Environment
#   ORT_GPU_VERSION  onnxruntime-gpu version to install (default 1.31.1)
#   WHEELS           folder of wheels to install from with no index (offline machines; note the
#                    onnxruntime-gpu 1.31.1 wheel alone is about 256 MB): it must
#                    hold onnxruntime-gpu, its dependencies (numpy, protobuf, flatbuffers,
#                    packaging, sympy, mpmath, coloredlogs, humanfriendly), onnx, ml_dtypes,
#                    typing_extensions, click, tqdm, pillow, and setuptools (to build onnxshrink)
#   PYTHON           interpreter for the venv (default python3); VENV: where (default
#                    /tmp/onnxshrink-gpu-venv, recreated each time)
#   MODEL, CANDIDATE, DATA, CALIB   the models and the .npz data (defaults: sample models)
#   RUNS             timed rounds (default 200); EXTRA: more flags for `onnxshrink bench`
#
# Exit status: 0 when every bench run succeeded, else the last failing run's status.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-/tmp/onnxshrink-gpu-check}}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-/tmp/onnxshrink-gpu-venv}"
ORT_GPU_VERSION="${ORT_GPU_VERSION:-1.31.1}"
MODEL="${MODEL:-$REPO/sample_models/resnet_mini.onnx}"
DATA="${DATA:-$REPO/sample_models/digits_eval.npz}"
CALIB="${CALIB:-$REPO/sample_models/digits_calib.npz}"
RUNS="${RUNS:-200}"
EXTRA="${EXTRA:-}"
mkdir -p "$OUT_DIR"

say() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }

say "GPU"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || die "nvidia-smi sees no GPU"

say "venv at $VENV (isolated from the system's site-packages)"
"$PYTHON" -m venv --clear "$VENV"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
if [[ -n "${WHEELS:-}" ]]; then
    WHEELS="$(cd "$WHEELS" && pwd)"
    PIP+=(--no-index --find-links "$WHEELS")
fi
"${PIP[@]}" "onnxruntime-gpu==$ORT_GPU_VERSION" "onnx>=1.21" "numpy>=1.26" "click>=8.1" "tqdm>=4.66" "pillow>=10"
if ! "${PIP[@]}" --no-deps "$REPO"; then
    # Building needs setuptools; without it, run from the source tree instead.
    echo "gpu_check: could not install onnxshrink (no setuptools?); using PYTHONPATH=$REPO" >&2
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
"$VPY" - <<'EOF' || die "the venv is not a clean onnxruntime-gpu environment"
import importlib.metadata as md
import sys

names = {d.metadata["Name"].lower() for d in md.distributions()}
cpu = sorted(n for n in names if n in ("onnxruntime", "onnxruntime-openvino", "onnxruntime-directml"))
if cpu:
    sys.exit(f"other onnxruntime packages in the GPU venv: {cpu}")
if "onnxruntime-gpu" not in names:
    sys.exit("onnxruntime-gpu is not installed")
import onnxruntime as ort

if not ort.__file__.startswith(sys.prefix):
    sys.exit(f"onnxruntime imported from outside the venv: {ort.__file__}")
print("onnxruntime-gpu", ort.__version__, "providers:", ", ".join(ort.get_available_providers()))
EOF

say "CUDA / cuDNN / TensorRT libraries"
# Library folders of pip-installed NVIDIA packages in the machine's own Python (if any).
NV_DIRS="$("$PYTHON" - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()]
seen = []
for root in roots:
    for pattern in ("nvidia/*/lib", "nvidia/*/lib64", "nvidia/cu*/lib", "tensorrt_libs", "tensorrt*/lib"):
        for d in sorted(glob.glob(os.path.join(root, pattern))):
            if d not in seen and glob.glob(os.path.join(d, "*.so*")):
                seen.append(d)
print(":".join(seen))
EOF
)"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d "$d" ]] && NV_DIRS="${NV_DIRS:+$NV_DIRS:}$d"
done
# Never leave an empty entry: it would mean the current directory.
LD_LIBRARY_PATH="$(printf '%s' "${NV_DIRS}:${LD_LIBRARY_PATH:-}" | tr -s ':' | sed 's/^://; s/:$//')"
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
HAVE_TRT=0
if "$VPY" -c 'import ctypes, sys; ctypes.CDLL("libnvinfer.so." + sys.argv[1])' 10 2>/dev/null; then
    HAVE_TRT=1
fi
echo "TensorRT libraries: $([[ $HAVE_TRT == 1 ]] && echo found || echo 'not found (tensorrt run skipped)')"

say "models"
[[ -f "$MODEL" ]] || die "model not found: $MODEL"
stem="$(basename "${MODEL%.onnx}")"
CANDIDATE="${CANDIDATE:-$(dirname "$MODEL")/$stem.int8.onnx}"
if [[ ! -f "$CANDIDATE" ]]; then
    CANDIDATE="$OUT_DIR/$stem.int8.onnx"
    echo "no int8 model given: quantizing $MODEL with onnxruntime.quantization -> $CANDIDATE"
    "$VPY" - "$MODEL" "$CANDIDATE" "$CALIB" <<'EOF'
import sys

import logging

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

logging.disable(logging.WARNING)
model, out, calib = sys.argv[1:4]
prepared = out + ".pre.onnx"
quant_pre_process(model, prepared, skip_symbolic_shape=True)  # ORT's recommended step (BN folding, shapes)
with np.load(calib) as npz:
    name = next(k for k in npz.files if k != "labels")
    samples = npz[name][:64]


class Reader(CalibrationDataReader):
    def __init__(self) -> None:
        self.items = iter({name: samples[i : i + 1]} for i in range(len(samples)))

    def get_next(self):
        return next(self.items, None)


quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, per_channel=True)
EOF
fi
echo "baseline  $MODEL"
echo "candidate $CANDIDATE"

# The console script exists once the lead registers `bench`; this runner works either way.
BENCH=("$VPY" -c '
import sys
from onnxshrink.cli import cli, main
if "bench" not in cli.commands:
    from onnxshrink.cli.bench_cmd import bench
    cli.add_command(bench)
sys.exit(main(["bench", *sys.argv[1:]]))')
"${BENCH[@]}" --list-providers

status=0
run_bench() {
    local provider="$1"
    say "onnxshrink bench --provider $provider"
    # shellcheck disable=SC2086 # EXTRA is split on purpose
    if "${BENCH[@]}" "$MODEL" "$CANDIDATE" --provider "$provider" --data "$DATA" --runs "$RUNS" \
        --report "$OUT_DIR/$provider" $EXTRA; then
        echo "gpu_check: $provider: ok"
    else
        status=$?
        echo "gpu_check: $provider: exit status $status" >&2
    fi
}
run_bench cuda
if [[ $HAVE_TRT == 1 ]]; then
    run_bench tensorrt
fi
say "reports under $OUT_DIR"
ls -R "$OUT_DIR" || true
exit "$status"
