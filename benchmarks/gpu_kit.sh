#!/usr/bin/env bash
# The GPU checks in one prepared script, for a session that is lent a device machine
# (see /work/.library/device/README.md: about 15 minutes of device time, all tries together).
#
#   bash benchmarks/gpu_kit.sh prepare     # here: wheels the device lacks -> .whl/ (git-ignored)
#   device run, carry [".whl"], timeout_s 600:
#       bash benchmarks/gpu_kit.sh run     # there: CUDA tests + speed benchmarks -> $OUT
#   bash benchmarks/gpu_kit.sh render DIR  # here: DIR = the files that came back -> docs/
#
# The device image has torch, numpy, scikit-image, safetensors, pytest and matplotlib but
# not monai, nibabel or SimpleITK; `prepare` downloads exactly those (about 58 MB, under
# the 64 MiB a call may carry together with the repository). Nothing here needs ../shared.
# `run` gives each step its own time limit, so one slow step cannot eat the others' time,
# and writes at most 8 files to $OUT (the most that come back).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu QUICK=1 ... run: a dry run of the plumbing here
if [ -n "${QUICK:-}" ]; then
    CLASSICAL_SIZE="--shape 16 64 64 --repeats 1"; LEARNED_SIZE="--shape 16 32 32 --set epochs=2"
else
    CLASSICAL_SIZE="--repeats 5"; LEARNED_SIZE=""
fi

case "${1:-}" in
prepare)
    rm -rf .whl && mkdir -p .whl
    # versions as pinned in constraints.txt; the device runs Python 3.12 on x86-64
    pins=$(grep -iE '^(monai|nibabel|simpleitk)==' constraints.txt)
    # shellcheck disable=SC2086
    ${PIP:-.venv/bin/python -m pip} download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pins || exit 1
    du -ch .whl/* | tail -n 1
    ;;
run)
    OUT=${OUT:-/tmp/gpu_kit_out}
    mkdir -p "$OUT"
    log="$OUT/gpu_kit.log"
    export PYTHONUNBUFFERED=1
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 1; }
    export PYTHONPATH="$PWD/src_core:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    step() {  # step NAME SECONDS COMMAND...
        local name=$1 limit=$2; shift 2
        echo "== $name (limit ${limit}s) $(date +%T)" | tee -a "$log"
        local t0=$SECONDS
        timeout "$limit" "$@" >>"$log" 2>&1
        echo "== $name: exit $? after $((SECONDS - t0))s" | tee -a "$log"
    }
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        $PY -c "import torch, numpy, monai, SimpleITK; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'monai', monai.__version__, 'sitk', SimpleITK.Version.VersionString(), 'cores', __import__('os').cpu_count())"
    } >>"$log" 2>&1
    # every test that needs CUDA (marked gpu, or skipped without it), plus the classical
    # methods' and the engine's tests, which then also run on this torch and numpy
    step pytest 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/core/test_staple.py tests/core/test_majority_vote.py tests/core/test_spatial_staple.py \
        tests/core/test_chunked.py tests/core/test_train.py -m "not slow" \
        --junitxml="$OUT/pytest.xml"
    # issue 2: staple and majority_vote end to end against SimpleITK on this machine's CPU
    # (2 threads as on the dev machine, then every core)
    # shellcheck disable=SC2086
    step classical_2t 100 $PY benchmarks/classical_speed.py --device "$DEVICE" --threads 2 \
        $CLASSICAL_SIZE --no-docs --json "$OUT/classical_speed_gpu_2threads.json"
    # shellcheck disable=SC2086
    step classical_all 60 $PY benchmarks/classical_speed.py --device "$DEVICE" --threads "$(nproc)" \
        $CLASSICAL_SIZE --no-docs --json "$OUT/classical_speed_gpu_allthreads.json"
    # spatial STAPLE, plain EM vs SQUAREM, on this GPU
    step spatial_staple 40 $PY benchmarks/spatial_staple_speed.py --device "$DEVICE" --repeats 1 \
        --no-docs --json "$OUT/spatial_staple_speed_gpu.json"
    # issue 3: time to fuse 128x128x64 with 4 raters and defaults, and bf16 throughput
    # shellcheck disable=SC2086
    step learned 220 $PY benchmarks/learned_fuse_speed.py --device "$DEVICE" $LEARNED_SIZE \
        --methods cm tgce mrprism avap unet softseg --out "$OUT/learned_fuse_speed_gpu.json"
    echo "done $(date +%T)" | tee -a "$log"
    ;;
render)
    dir=${2:?usage: gpu_kit.sh render DIR}
    for f in "$dir"/classical_speed_gpu_*.json; do
        [ -e "$f" ] && .venv/bin/python benchmarks/classical_speed.py --from-json "$f"
    done
    for f in learned_fuse_speed_gpu.json spatial_staple_speed_gpu.json; do
        [ -e "$dir/$f" ] && cp "$dir/$f" docs/
    done
    echo "docs/BENCHMARKS.md: classical GPU rows rendered; learned_fuse_speed_gpu.json and spatial_staple_speed_gpu.json copied to docs/ (write their tables into the cm_baselines and spatial_staple_speed sections by hand)"
    ;;
*)
    sed -n 2,16p "$0"
    exit 2
    ;;
esac
