#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what scripts/gpu-check.sh needs on a GPU machine that has no
# cargo and no network (results/gpu/README.md), and measures it against the 64 MiB carried:
#   .gpu/runner.xz                      this runner built with --features cuda, stripped, xz'd
#   .gpu/revision                       the commit it was built from
#   .gpu/nvidia_cuda_{crt,cccl}-*.whl   the CUDA headers cubecl's kernels include that PyTorch's
#                                       wheels lack (crt/, cccl/), for NVRTC 13.0 (PyTorch 2.11)
#   .gpu/runner-tch.xz                  with --tch VENV: a runner with --features tch built
#                                       against that venv's PyTorch (see "tch" in the README)
# gpu-check.sh unpacks the runners on the machine (two uncompressed would not fit).
#
#   scripts/gpu-pack.sh [--tch ~/.cache/nvit/venv-torch-2.11]
set -euo pipefail
cd "$(dirname "$0")/.."
TCH_VENV=
case ${1:-} in
  --tch) TCH_VENV=${2:?--tch needs the virtual environment of the PyTorch to build against} ;;
  "") ;;
  *) echo "gpu-pack.sh: unknown argument \`$1\`" >&2; exit 2 ;;
esac
LIMIT=$((64 * 1024 * 1024))
mkdir -p .gpu

cargo build --release --locked --features cuda
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
rm -f .gpu/runner .gpu/runner-tch .gpu/*.xz
strip -o .gpu/runner "$target/release/runner"
ls -l .gpu/runner
xz -T0 -6 .gpu/runner
git describe --always --dirty >.gpu/revision

python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
  --dest .gpu nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85

if [ -n "$TCH_VENV" ]; then
  # burn 0.21's tch 0.22 checks for PyTorch 2.9.0; the machine has another (the bypass), and the
  # rpath build.rs records is this machine's: gpu-check.sh puts the machine's torch/lib first.
  VIRTUAL_ENV=$TCH_VENV PATH="$TCH_VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1 \
    cargo build --release --locked --features tch --target-dir "$target/tch"
  strip -o .gpu/runner-tch "$target/tch/release/runner"
  ls -l .gpu/runner-tch
  xz -T0 -6 .gpu/runner-tch
fi

ls -l .gpu/
carried=$(du -cb .gpu/* | tail -n 1 | cut -f 1)
tracked=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f 1)
total=$((carried + tracked))
printf '.gpu/: %d bytes; tracked files: %d bytes; together %.1f MiB of 64 MiB\n' "$carried" "$tracked" "$(awk -v t="$total" 'BEGIN { print t / 1048576 }')"
[ "$total" -le "$LIMIT" ] || { echo "gpu-pack.sh: over the 64 MiB the device tool carries" >&2; exit 1; }
