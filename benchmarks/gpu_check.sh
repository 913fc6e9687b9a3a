#!/usr/bin/env bash
# The prepared GPU check (issue #11's speed table) for a lent GPU machine (the `device` tool's
# H100/H200: python3 with torch, numpy, opencv, pillow, pyyaml, safetensors, tqdm, tensorboard;
# no network). Here, once:   bash benchmarks/gpu_check.sh --fetch
#   (kornia, kornia_rs and omegaconf wheels into .device/wheels, ignored by git, ~8 MB)
# There, as one call:        run  command: bash benchmarks/gpu_check.sh   carry: [".device"]
#                                 timeout_s: 420 (leaves a rerun inside 15 minutes of device time)
# It installs the missing wheels without network, runs dida from src/ (no install), and writes to
# $OUT: env.txt (GPU, versions), eager.txt (the table's 8 eager rows, MiT-B5, 512², batch 2, with
# --profile) and compiled.txt (its 2 `train.compile=blocks` rows, each compiled with an empty
# cache), within TOTAL_S seconds (default 390): the eager rows get at most EAGER_S (200), the
# compiled ones the rest (or COMPILED_S); a row that finished is in the log ("done: ...") even
# when the limit cut the table short.
# Try it on a CPU first: DEVICE=cpu VARIANT=mit_b0 CROP=64 bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
WHEELS=.device/wheels
NEEDED="kornia==0.9.0 kornia_rs==0.2.0 omegaconf==2.4.0"
if [ "${1:-}" = --fetch ]; then
    mkdir -p "$WHEELS"
    for version in 3.11 3.12 3.13; do  # the device's python3 was 3.12 (2026-11)
        python3 -m pip download -q --only-binary=:all: --no-deps --python-version "$version" \
            --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" $NEEDED || exit 1
    done
    ls "$WHEELS"
    exit 0
fi
OUT=${OUT:-work_dirs/gpu_check}
DEVICE=${DEVICE:-cuda} VARIANT=${VARIANT:-mit_b5} CROP=${CROP:-512}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! $PY -c "import kornia, omegaconf" 2>/dev/null; then
    [ -d "$WHEELS" ] || { echo "no $WHEELS: run 'bash benchmarks/gpu_check.sh --fetch' first" >&2; exit 2; }
    $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps $NEEDED || exit 1
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    $PY -c "import sys, torch, kornia, omegaconf; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'kornia', kornia.__version__, 'omegaconf', omegaconf.__version__)"
    git log --oneline -1 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"
bench="$PY benchmarks/train_step.py --device $DEVICE --variant $VARIANT --crop $CROP --batch 2 --profile --table --warmup 3 --repeats 5"
table() {  # NAME LIMIT_S ARGS...: one part of the table; its time limit is no failure
    local name=$1 limit=$2 rc
    shift 2
    timeout "$limit" $bench "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ]; then
        echo "($name: stopped at its ${limit} s limit; the rows above finished)" | tee -a "$OUT/$name.txt"
        rc=0
    fi
    return "$rc"
}
status=0
TOTAL_S=${TOTAL_S:-390}
start=$SECONDS
table eager "${EAGER_S:-200}" --table-compile false || status=$?
left=$((TOTAL_S - (SECONDS - start)))
table compiled "${COMPILED_S:-$((left > 1 ? left : 1))}" --table-compile blocks || status=$?
exit "$status"
