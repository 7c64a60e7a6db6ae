#!/usr/bin/env bash
# The one prepared GPU check (issue 18): the `gpu` tests with CUDA graphs on and off, then
# offline_throughput.py and profile_step.py on CUDA, bounded to ~8 minutes in all.
#
# 1. Here, on a machine with network access, at the repository root (once per session):
#        bash benchmarks/gpu_check.sh prepare
#    It fills .gpu_carry/ (git-ignored, ~15 MB): wheels of the packages the GPU machine's
#    image lacks (it has torch, triton, transformers; it cannot download) and the default
#    model's tokenizer files (the tests' tiny models and the benchmarks' random-weight
#    models use them; weights are made there, since checkpoints cannot travel).
# 2. On the lent machine (the device tool's `run`, from the repository root):
#        command: bash benchmarks/gpu_check.sh     carry: [".gpu_carry"]    timeout_s: 560
# Everything lands in $OUT: gpu_check.log (the whole output) and gpu_check.tgz (pytest's
# junit files and every benchmark JSON). GPU_CHECK_BUDGET_S (default 480) bounds the run;
# a stage that would overrun it is cut by `timeout` and the later ones are skipped.
set -uo pipefail

CARRY=.gpu_carry
# Runtime and test dependencies missing from the GPU image, at the versions of this venv.
WHEELS="msgspec pyzmq fastapi starlette annotated-doc uvicorn pydantic pydantic-core
annotated-types typing-inspection typing-extensions opentelemetry-api llguidance gguf
pytest-asyncio pytest pluggy"

prepare() {
    local py=${PYTHON:-.venv/bin/python} name version platforms=() n
    mkdir -p "$CARRY/wheels" "$CARRY/tokenizer"
    for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    for name in $WHEELS; do  # this venv's version where the index has it, else the newest
        version=$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
            -d "$CARRY/wheels" "$name==$version" 2>/dev/null \
        || "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
            -d "$CARRY/wheels" "$name" 2>/dev/null \
        || { echo "no wheel of $name for the GPU machine (python 3.12, x86-64)"; return 1; }
    done
    local tokenizer
    tokenizer=$(PYTHONPATH=$PWD "$py" -c \
        "from kvflow.model.registry import resolve_model; print(resolve_model(None))") || return 1
    cp "$tokenizer"/tokenizer* "$tokenizer"/chat_template.jinja "$CARRY/tokenizer/"
    ls "$CARRY/wheels"
    du -sh "$CARRY"
}

DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-480}))
WORK=/tmp/gpu_check

# stage SECONDS NAME CMD...: run CMD for at most SECONDS (less if the budget is nearly spent)
stage() {
    local want=$1 name=$2 left
    shift 2
    left=$((DEADLINE - SECONDS))
    if ((left < 30)); then
        echo "=== $name: skipped, ${left}s of the budget left"
        return
    fi
    ((want > left)) && want=$left
    echo "=== $name (at most ${want}s): $*"
    local start=$SECONDS
    timeout "$want" "$@"
    echo "=== $name: exit $? after $((SECONDS - start))s"
}

setup() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || return 1
    python3 -m venv --system-site-packages /tmp/kvflow-venv || return 1
    PY=/tmp/kvflow-venv/bin/python
    "$PY" -m pip install -q --no-index --no-deps --no-compile "$CARRY"/wheels/*.whl || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || echo "editable install failed: kvflow is imported from PYTHONPATH"
    export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export KVFLOW_TEST_TOKENIZER_DIR=$PWD/$CARRY/tokenizer KVFLOW_CACHE_DIR=$WORK/cache
    "$PY" -c "import torch, triton, kvflow; print('torch', torch.__version__, 'triton',
triton.__version__, torch.cuda.get_device_name())" || return 1
}

models() {
    local shape
    for shape in smollm2-135m qwen2-0.5b; do
        "$PY" benchmarks/random_model.py --shape "$shape" --tokenizer "$CARRY/tokenizer" \
            --out "$WORK/models/$shape" || return 1
    done
}

offline() {  # offline MODEL REQUESTS: graphs on vs off, transformers static and continuous
    "$PY" benchmarks/offline_throughput.py --device cuda --model "$WORK/models/$1" \
        --num-requests "$2" --max-num-seqs "$2" --hf-batch-size 64 --eager-baseline \
        --json "$WORK/results/offline_$1_$2.json"
}

profile() {  # profile MODEL REQUESTS [--enforce-eager]
    "$PY" benchmarks/profile_step.py --device cuda --model "$WORK/models/$1" \
        --num-requests "$2" --steps 5 "${@:3}" --json "$WORK/results/profile_$1_$2${3:+_eager}.json"
}

device_check() {
    OUT=${OUT:-$WORK/out}
    mkdir -p "$OUT" "$WORK/results"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
    trap 'tar czf "$OUT/gpu_check.tgz" -C "$WORK" results 2>/dev/null' EXIT
    date -u
    setup || { echo "setup failed"; exit 1; }
    # only the modules holding gpu tests: others import packages the image lacks (openai...)
    local files pytest
    mapfile -t files < <(grep -rl "mark.gpu" tests --include "test_*.py")
    pytest=("$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors)
    stage 170 "gpu tests, CUDA graphs on" "${pytest[@]}" \
        --junitxml="$WORK/results/gpu_tests_graphs.xml" "${files[@]}"
    KVFLOW_TEST_ENFORCE_EAGER=1 stage 150 "gpu tests, enforce_eager" "${pytest[@]}" \
        --junitxml="$WORK/results/gpu_tests_eager.xml" "${files[@]}"
    stage 60 "random-weight models" models
    stage 90 "offline smollm2-135m 256" offline smollm2-135m 256
    stage 40 "profile smollm2-135m 256" profile smollm2-135m 256
    stage 40 "profile smollm2-135m 256 eager" profile smollm2-135m 256 --enforce-eager
    stage 90 "offline qwen2-0.5b 256" offline qwen2-0.5b 256
    stage 120 "offline smollm2-135m 1024" offline smollm2-135m 1024
    stage 120 "offline qwen2-0.5b 1024" offline qwen2-0.5b 1024
    date -u
}

if [[ ${1:-} == prepare ]]; then
    prepare
else
    device_check
fi
