#!/usr/bin/env bash
# Fill .gpu_wheels/ with the pure-Python packages that r1vl_fast needs and the GPU machines' image lacks (it has
# torch, triton, transformers, matplotlib, tensorboard, pybind11, scikit-build-core, cmake, pytest-benchmark; it
# cannot download). Run here, on a machine that reaches the package registry, then carry .gpu_wheels/ to the GPU
# machine, where benches/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
pip download -q --no-deps --only-binary=:all: -d .gpu_wheels \
  "math-verify==0.9.0" "latex2sympy2_extended==1.11.0" "antlr4-python3-runtime==4.13.2" "liger-kernel"
ls -la .gpu_wheels
