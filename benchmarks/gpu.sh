#!/usr/bin/env bash
# benchmarks/gpu_end_to_end.py on a machine with one CUDA GPU, no network and no halluguard installed,
# whose Python may lack some of what halluguard needs or hold an older transformers than its floor.
#
#   bash benchmarks/gpu.sh wheels     with a network, beforehand: into .whl/ (made anew), the wheels
#                                     such a machine lacks (transformers at pyproject.toml's floor,
#                                     pycocotools, lemminflect, regex), built for CPython $WHEELS_PYTHON
#                                     (default 3.12, the GPU machines' Python) on x86-64 Linux
#   bash benchmarks/gpu.sh [ARGS]     on the GPU machine: the wheels in .whl/ (if any) installed under
#                                     /tmp/site, then gpu_end_to_end.py ARGS, its files under $OUT
#                                     (default gpu-results/)
#
# The run keeps to a budget of 480 s by default (--budget): with the machine's start it fits a lease of
# under 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then
    floor=$(python3 -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(m.group(1) for d in deps if (m := re.fullmatch(r"transformers>=(\S+)", d))))')
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    rm -rf .whl  # one version of each package: two stop the install
    python3 -m pip download --no-deps --only-binary=:all: --python-version "${WHEELS_PYTHON:-3.12}" --implementation cp \
        "${platforms[@]}" \
        -d .whl "transformers==$floor" pycocotools lemminflect regex
    ls -l .whl
    exit 0
fi

install=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
if compgen -G ".whl/*.whl" > /dev/null; then
    if ! "${install[@]}" .whl/*.whl; then  # a wheel for another Python, say: the others still go in
        echo "gpu.sh: not every wheel in .whl/ installs on $(python3 --version); one by one:" >&2
        for wheel in .whl/*.whl; do
            "${install[@]}" "$wheel" || echo "gpu.sh: left out $wheel" >&2
        done
    fi
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_end_to_end.py --out "${OUT:-gpu-results}" "$@"
