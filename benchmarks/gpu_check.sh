#!/usr/bin/env bash
# One GPU check of af3 in under 8 minutes: the CUDA tests, then af3's Engine vs transformers on a random AF3 of the
# real shapes (benchmarks/gpu_bench.py), on a machine with one NVIDIA GPU, a Python that holds a CUDA build of
# PyTorch (and transformers, pytest), and no network.
#
#   bash benchmarks/gpu_check.sh prepare [PYTHON_VERSION]   # where pip reaches PyPI: wheels into .whl/
#   bash benchmarks/gpu_check.sh run [OUT_DIR]              # on the GPU machine, from the repository root
#
# `prepare` builds af3's own wheel and downloads, for the GPU machine's Python (default 3.12) on manylinux x86-64,
# the wheels of af3's dependencies that such an image usually lacks (soundfile, soxr, av, typer 0.29). Nothing of
# torch, numpy, tokenizers, safetensors, jinja2, rich or transformers is carried: the machine's own are used
# (af3 needs torch >= 2.4). Add `echo /.whl/ >> .git/info/exclude` so that the wheels travel untracked (about 40 MB).
#
# `run` installs af3 and those wheels into a throw-away folder on PYTHONPATH (nothing else is changed), then
#   1. pytest -m cuda over tests/cuda and tests/test_features.py (150 s at most; the server's tests need packages
#      such an image lacks), log in OUT_DIR/tests.log;
#   2. python -m benchmarks.gpu_bench (240 s at most): decode tok/s at batch 1, 8 and 32, time to first token for
#      30 s and 10 min of audio, peak GPU memory, af3 and transformers, into OUT_DIR/gpu.json and OUT_DIR/gpu.md.
# It exits non-zero when the tests fail or the benchmark does not finish; the table is printed either way it ends.
set -uo pipefail
cd "$(dirname "$0")/.."

what=${1:-run}
if [[ $what == prepare ]]; then
    py=${2:-3.12}
    rm -rf .whl && mkdir -p .whl || exit 1
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl . || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "soundfile>=0.12" "soxr>=0.3" "av>=12" "typer>=0.29,<0.30" "cffi>=1.0" "pycparser" \
        "shellingham>=1.3" || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "typing-extensions>=4.12" || exit 1
    du -sh .whl
    ls .whl
    exit 0
fi
if [[ $what != run ]]; then
    echo "usage: bash benchmarks/gpu_check.sh prepare [PYTHON_VERSION] | run [OUT_DIR]" >&2
    exit 2
fi

out=${2:-${OUT:-gpu-check}}
mkdir -p "$out"
start=$(date +%s)
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "error: this Python's torch sees no CUDA device" >&2
    exit 2
}
if [[ -d .whl ]]; then
    site=$(mktemp -d /tmp/af3-site.XXXXXX)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site:$PWD"
else  # no wheels: af3 from this checkout (its dependencies must be installed already)
    export PYTHONPATH="$PWD/src:$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c 'import af3, torch; print("af3", af3.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'

timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/cuda tests/test_features.py 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
echo "tests: exit $tests after $(( $(date +%s) - start )) s"

timeout 240 python3 -m benchmarks.gpu_bench --json "$out/gpu.json" --md "$out/gpu.md"
bench=$?
echo "benchmark: exit $bench; $(( $(date +%s) - start )) s in all"
[[ $tests -eq 0 && $bench -eq 0 ]]
