#!/usr/bin/env bash
# The GPU checks as one command, for the rare, short loan of a GPU machine (results/gpu/README.md):
# the runner built here with `--features cuda` and carried in .gpu/ with the CUDA headers its
# kernels need (scripts/gpu-pack.sh fills it), run there on its backend beside the machine's own
# PyTorch. Most valuable first, each part under its own time limit and
# the whole under --budget, so that a call cut short still brings back what ran: correctness
# (NVRTC and the kernel headers, the backend against flex, every stage kind end to end), then speed beside PyTorch, then the
# method at full DeiT-B width, then data parallel, then tch. A part that fails is written down
# in summary.csv and the log, and the parts that do not depend on it still run.
#
#   scripts/gpu-check.sh --out "$OUT"                          # on the GPU machine
#   scripts/gpu-check.sh --rehearsal --backend flex --runner target/release/runner \
#       --python .venv/bin/python --out /tmp/gpu-check        # on a CPU, in seconds (.ci/run)
#
# Writes at most 8 files into --out; the log and every CSV name the device, driver, CUDA and
# PyTorch versions:
#   gpu-check.log       everything printed, the versions first
#   summary.csv         one row per check: status, seconds, what it wrote
#   parity.csv          the backend's loss, logits and gradients against flex (and tch's)
#   pipeline.csv        pipelines/gpu-check.toml's metrics on the backend (every stage kind)
#   vs-pytorch.csv      training and inference images/s beside PyTorch + timm, f32 and bf16
#   latency.csv         DeiT-B's latency table's estimate against paired measurement
#   latency.table.json  that table (reference JSON: `runner bench latency --table`)
#   data-parallel.csv   one device against the same device listed twice
# Exits 0 when every check passed or was skipped for time, 1 when one failed.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

RUNNER=.gpu/runner
TCH_RUNNER=.gpu/runner-tch
BACKEND=cuda
PYTHON=python3
OUT_DIR=${OUT:-}
BUDGET=
REHEARSAL=false
while [ $# -gt 0 ]; do
  case $1 in
    --runner) RUNNER=$2; shift 2 ;;
    --tch-runner) TCH_RUNNER=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --rehearsal) REHEARSAL=true; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument \`$1\` (--help lists them)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
[ -n "$OUT_DIR" ] || { echo "gpu-check.sh: no output folder: pass --out DIR or set OUT" >&2; exit 2; }
[ -x "$RUNNER" ] || [ -f "$RUNNER.xz" ] || { echo "gpu-check.sh: $RUNNER: no runner binary there, nor $RUNNER.xz (scripts/gpu-pack.sh builds it)" >&2; exit 2; }
case $BUDGET in
  "") if $REHEARSAL; then BUDGET=300; else BUDGET=480; fi ;;
  *[!0-9]*) echo "gpu-check.sh: --budget $BUDGET: not a whole number of seconds" >&2; exit 2 ;;
esac
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# Where the carried files are: the runners, the CUDA header wheels, the revision.
CARRIED=$(cd "$(dirname "$RUNNER")" && pwd)
# Scratch: the stage caches, pipeline results and the pieces merged into $OUT_DIR.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
# cubecl compiles each kernel at run time, and every runner call below is a new process: its
# compiled-kernel cache, off by default, kept in target/ beside its autotune cache, spares the
# later calls what the first compiled (a cubecl.toml of the repository's own is left as it is).
CUBECL_TOML=
if [ ! -e cubecl.toml ]; then
  printf '# Written by scripts/gpu-check.sh for its run, then removed.\n[compilation]\ncache = "target"\n' >cubecl.toml && CUBECL_TOML=cubecl.toml
fi
trap 'rm -rf "$WORK" $CUBECL_TOML' EXIT

# unpack PATH: the path of PATH's binary, unpacked from PATH.xz into $WORK where that is what was
# carried (xz takes a runner from 63 to 12 MB, and two must fit in the 64 MiB with the repository).
unpack() {
  if [ -x "$1" ]; then
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
  elif [ -f "$1.xz" ]; then
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1.xz" "$WORK/$(basename "$1")" &&
      chmod +x "$WORK/$(basename "$1")" && echo "$WORK/$(basename "$1")"
  else
    return 1
  fi
}
RUNNER=$(unpack "$RUNNER") || { echo "gpu-check.sh: cannot unpack the runner" >&2; exit 2; }
TCH_RUNNER=$(unpack "$TCH_RUNNER") || TCH_RUNNER=
export RUNNER_CACHE=$WORK/cache
DEADLINE=$((SECONDS + BUDGET))
FAILED=0

# What differs between a GPU and the CPU rehearsal: sizes. The commands, flags and files do not.
if $REHEARSAL; then
  AGAINST=ndarray
  TORCH_MODELS=(pipelines/gpu-check.toml); TORCH_BATCHES=("8" "16"); TORCH_STEPS=1
  PRECISIONS=(f32)
  LATENCY=(--dense pipelines/gpu-check.toml --batch 8 --grid coarse --repeats 1 --pairs 2 --between 1)
  NVIT_SMOKE=(pipelines/gpu-check.toml --set 'pipeline.name="gpu-check-smoke"' --set stages.train.epochs=1)
  DP_MODEL=(--model pipelines/gpu-check.toml --batch 16 --steps 2)
else
  AGAINST=flex
  TORCH_MODELS=(deit-tiny-distilled deit-small-distilled deit-base-distilled)
  # 256 alone: where it does not fit, only it fails.
  TORCH_BATCHES=("64,128" "256"); TORCH_STEPS=5
  PRECISIONS=(f32 bf16)
  LATENCY=(--dense deit-base-distilled --pruned benches/nvit-base-like.json --batch 256 --grid coarse --repeats 5 --pairs 10 --between 2)
  NVIT_SMOKE=(pipelines/nvit-base.toml --with pipelines/smoke.toml)
  DP_MODEL=(--model deit-small-distilled --batch 128 --steps 5)
fi

# The machine, for every file: the device, its driver, the CUDA it supports, PyTorch.
versions() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
    CUDA=$(nvidia-smi | grep -o 'CUDA Version: *[0-9.]*' | head -n 1 | sed 's/.*: *//')
    ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
  else
    DEVICE="cpu $(grep -m 1 'model name' /proc/cpuinfo | sed 's/.*: //') x$(nproc)"
    DRIVER=none
    CUDA=none
    ARCH=
  fi
  TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__ + " (cuda " + str(torch.version.cuda) + ")")' 2>/dev/null) || TORCH=none
}

# What the cuda runner loads at run time where no CUDA toolkit is installed, from the nvidia-*
# wheels PyTorch comes with: NVRTC, with which cubecl compiles its kernels at run time, and NCCL
# (as libnccl.so, a name cudarc looks for). NVRTC compiles against $CUDA_PATH/include, where
# every kernel includes cuda_runtime.h and some mma.h (crt/), cuda/barrier and cuda/pipeline
# (cccl/); PyTorch's wheels have the first but not crt/ or cccl/, so the nvidia-cuda-crt and
# nvidia-cuda-cccl wheels are carried beside the runner and merged in. PyTorch's lib/ is for the
# tch runner.
cuda_runtime() {
  local found include nccl wheel entry
  found=$("$PYTHON" - <<'EOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
libs, include = [], ""
for root in roots:
    for pattern in ("nvidia/*/lib", "nvidia/*/*/lib", "torch/lib"):
        for d in sorted(glob.glob(os.path.join(root, pattern))):
            if glob.glob(os.path.join(d, "*.so*")) and d not in libs:
                libs.append(d)
    for h in sorted(glob.glob(os.path.join(root, "nvidia/*/include/cuda_fp16.h"))):
        include = include or os.path.dirname(h)
print(":".join(libs))
print(include)
EOF
  )
  TORCH_LIBS=$(echo "$found" | sed -n 1p)
  include=$(echo "$found" | sed -n 2p)
  first_lib() { echo "$TORCH_LIBS" | tr ':' '\n' | while read -r d; do ls "$d"/$1 2>/dev/null; done | head -n 1; }
  mkdir -p "$WORK/lib"
  nccl=$(first_lib 'libnccl.so.*')
  [ -n "$nccl" ] && ln -sf "$nccl" "$WORK/lib/libnccl.so"
  NVRTC=$(first_lib 'libnvrtc.so.[0-9]*')
  TORCH_LIBS="$WORK/lib${TORCH_LIBS:+:$TORCH_LIBS}"
  if [ -z "${CUDA_PATH:-}" ] && [ ! -e /usr/local/cuda/include/cuda_fp16.h ] && [ -n "$include" ]; then
    mkdir -p "$WORK/cuda/include"
    ln -s "$include"/* "$WORK/cuda/include/"
    for wheel in "$CARRIED"/nvidia_cuda_*.whl; do
      [ -f "$wheel" ] || continue
      "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$WORK/wheels" || continue
    done
    for entry in "$WORK"/wheels/nvidia/*/include/*; do
      [ -e "$entry" ] && [ ! -e "$WORK/cuda/include/$(basename "$entry")" ] && ln -s "$entry" "$WORK/cuda/include/"
    done
    export CUDA_PATH=$WORK/cuda
  fi
}

# Appends the machine's columns to each row of a CSV: a file carries its own conditions.
stamp() {
  local file=$1 tmp
  [ -s "$file" ] || return 0
  tmp=$file.stamping
  awk -v dev="$DEVICE" -v drv="$DRIVER" -v cuda="$CUDA" -v torch="$TORCH" -v rev="$REVISION" '
    function q(s) { gsub(/"/, "\"\"", s); return "\"" s "\"" }
    NR == 1 { print $0 ",machine,gpu_driver,cuda_version,torch_version,revision"; next }
    { print $0 "," q(dev) "," q(drv) "," q(cuda) "," q(torch) "," q(rev) }' "$file" >"$tmp" && mv "$tmp" "$file"
}

# Appends the CSV $2, stamped, to $1, its header only once: each file is complete as it grows.
merge() {
  local into=$1 part=$2
  [ -s "$part" ] || return 0
  stamp "$part"
  if [ -s "$into" ]; then tail -n +2 "$part" >>"$into"; else cat "$part" >"$into"; fi
}

record() { # record CHECK STATUS SECONDS DETAIL: one row of summary.csv, written at once
  local f=$OUT_DIR/summary.csv
  [ -s "$f" ] || echo "check,status,seconds,detail,machine,gpu_driver,cuda_version,torch_version,revision" >"$f"
  printf '"%s","%s",%s,"%s","%s","%s","%s","%s","%s"\n' "$1" "$2" "$3" "${4//\"/\'}" "$DEVICE" "$DRIVER" "$CUDA" "$TORCH" "$REVISION" >>"$f"
}

# check NAME LIMIT DETAIL COMMAND...: runs COMMAND under min(LIMIT, what is left of the budget),
# its output into the log; records ok, failed (exit N), timed out or skipped; returns its status.
check() {
  local name=$1 limit=$2 detail=$3 left start rc status
  shift 3
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "=== $name: skipped, ${left}s of the budget left"
    record "$name" "skipped (out of time)" 0 "$detail"
    return 3
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== [$(date -u +%H:%M:%S), ${SECONDS}s] $name (limit ${limit}s)"
  start=$SECONDS
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ $rc = 0 ] || FAILED=1
  echo "=== $name: $status in $((SECONDS - start))s"
  record "$name" "$status" $((SECONDS - start)) "$detail"
  return $rc
}

main() {
  versions
  cuda_runtime
  # The commit the runner was built from (gpu-pack.sh writes it; the machine's copy has no .git).
  REVISION=$(cat "$CARRIED/revision" 2>/dev/null || git describe --always --dirty 2>/dev/null || echo unknown)
  export LD_LIBRARY_PATH="${TORCH_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "=== gpu-check.sh $( $REHEARSAL && echo '(CPU rehearsal) ')at revision $REVISION, $(date -u +%FT%TZ), budget ${BUDGET}s"
  echo "machine: $DEVICE; driver: $DRIVER; CUDA: $CUDA; PyTorch: $TORCH"
  echo "runner: $RUNNER ($(stat -c %s "$RUNNER") bytes), backend $BACKEND; tch runner: ${TCH_RUNNER:-none}; python: $PYTHON"
  echo "library path: $LD_LIBRARY_PATH"
  echo "CUDA headers: ${CUDA_PATH:-/usr/local/cuda}$([ -e "${CUDA_PATH:-/usr/local/cuda}/include/cccl" ] && echo ', with CCCL' || echo ', without CCCL')"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi
  "$PYTHON" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "cuda available:", torch.cuda.is_available())'
  "$RUNNER" --version

  # 0. Whether NVRTC compiles what cubecl's kernels include, before any kernel is needed.
  if [ -n "$ARCH" ] && [ -n "$NVRTC" ]; then
    check nvrtc 30 "scripts/nvrtc_check.py: cubecl's kernel headers with NVRTC for sm_$ARCH" \
      "$PYTHON" scripts/nvrtc_check.py --nvrtc "$NVRTC" --cuda-path "${CUDA_PATH:-/usr/local/cuda}" --arch "$ARCH"
  else
    record nvrtc "skipped (no GPU or no libnvrtc)" 0 "scripts/nvrtc_check.py"
  fi

  # 1. Correctness: the backend's forward and backward against flex's (on the CPU rehearsal,
  # flex against ndarray), then every stage kind end to end, then the pruned model out as ONNX.
  check parity 120 "bench parity: loss, logits and 8 gradients within 1e-4 of $AGAINST" \
    "$RUNNER" bench parity --backend "$BACKEND" --against "$AGAINST" --out "$WORK/parity.csv"
  merge "$OUT_DIR/parity.csv" "$WORK/parity.csv"

  # Scratch results; export finds the cached stages by the same keys (the backend is one of them).
  local keys=(--set "pipeline.results_dir=\"$WORK/results\"" --set "pipeline.runs_dir=\"$WORK/runs\"" --set "pipeline.backend=\"$BACKEND\"")
  if check pipeline 180 "pipelines/gpu-check.toml: train, evaluate, profile_latency, hessian_scores, prune, distill, evaluate, report" \
    "$RUNNER" run pipelines/gpu-check.toml "${keys[@]}"; then
    merge "$OUT_DIR/pipeline.csv" "$WORK/results/gpu-check/metrics.csv"
    check "export onnx" 60 "runner export --stage distill --format onnx" \
      "$RUNNER" export pipelines/gpu-check.toml --stage distill --format onnx --out "$WORK/pruned.onnx" "${keys[@]}"
    check "export safetensors" 60 "runner export --stage prune: model.safetensors and dims.json" \
      "$RUNNER" export pipelines/gpu-check.toml --stage prune --out "$WORK/pruned" "${keys[@]}"
  else
    record export "skipped (the pipeline failed)" 0 "runner export"
  fi

  # 2. Speed beside PyTorch in the same call: one invocation per model and batch group, so that
  # one that fails or runs out of memory costs only its own rows.
  local precision model batches
  for precision in "${PRECISIONS[@]}"; do
    for model in "${TORCH_MODELS[@]}"; do
      for batches in "${TORCH_BATCHES[@]}"; do
        local part=$WORK/vs-$precision-$(basename "$model" .toml)-${batches//,/-}.csv
        check "vs-pytorch $(basename "$model" .toml) batch $batches $precision" 150 "$BACKEND and PyTorch + timm, train and inference images/s" \
          "$RUNNER" bench vs-pytorch --backends "$BACKEND" --python "$PYTHON" --precision "$precision" --steps "$TORCH_STEPS" \
          --models "$(echo "$batches" | tr ',' '\n' | sed "s|^|$model:|" | paste -sd,)" --out "$part"
        merge "$OUT_DIR/vs-pytorch.csv" "$part"
      done
    done
    # The method at full width after the f32 speeds: DeiT-B's latency table at batch 256.
    if [ "$precision" = f32 ]; then
      # On the CPU, the tiny pipeline's pruned widths stand for NViT-B's.
      local pruned=()
      $REHEARSAL && pruned=(--pruned "$WORK/pruned")
      check latency 150 "bench latency: the table's estimate against paired measurement" \
        "$RUNNER" bench latency --backend "$BACKEND" "${LATENCY[@]}" "${pruned[@]}" --out "$WORK/latency.csv"
      merge "$OUT_DIR/latency.csv" "$WORK/latency.csv"
      [ -s "$WORK/latency.table.json" ] && cp "$WORK/latency.table.json" "$OUT_DIR/latency.table.json"
    fi
  done

  # 3. The paper's pipeline at full width (the smoke profile: random weights, a few steps).
  check nvit-base-smoke 180 "${NVIT_SMOKE[*]}" \
    "$RUNNER" run "${NVIT_SMOKE[@]}" "${keys[@]}"

  # 4. Data parallel on the one device listed twice: the batch in two shards, run in turn.
  local devices
  for devices in 0 0,0; do
    check "data parallel --devices $devices" 90 "bench model ${DP_MODEL[*]}" \
      "$RUNNER" bench model --backend "$BACKEND" "${DP_MODEL[@]}" --devices "$devices" --out "$WORK/dp-$devices.csv"
    merge "$OUT_DIR/data-parallel.csv" "$WORK/dp-$devices.csv"
  done

  # 5. tch (PyTorch's kernels through the runner), where a tch build was carried.
  if [ -n "$TCH_RUNNER" ]; then
    check "tch parity" 90 "bench parity --backend tch against $AGAINST" \
      "$TCH_RUNNER" bench parity --backend tch --against "$AGAINST" --out "$WORK/parity-tch.csv"
    merge "$OUT_DIR/parity.csv" "$WORK/parity-tch.csv"
    # LibTorch falls back to the CPU where it sees no GPU: on a GPU machine that is a failure.
    if [ -n "$ARCH" ] && [ -s "$WORK/parity-tch.csv" ] && ! grep -q ',cuda ' "$WORK/parity-tch.csv"; then
      record "tch sees the GPU" failed 0 "LibTorch reported no CUDA device: tch ran on the CPU"
      FAILED=1
    fi
    for precision in "${PRECISIONS[@]}"; do
      check "vs-pytorch tch $precision" 150 "tch and PyTorch + timm" \
        "$TCH_RUNNER" bench vs-pytorch --backends tch --python "$PYTHON" --precision "$precision" --steps "$TORCH_STEPS" \
        --models "${TORCH_MODELS[-1]}:${TORCH_BATCHES[0]%%,*}" --out "$WORK/vs-tch-$precision.csv"
      merge "$OUT_DIR/vs-pytorch.csv" "$WORK/vs-tch-$precision.csv"
    done
  else
    record tch "skipped (no tch runner carried)" 0 "a runner built with --features tch"
  fi

  local files
  files=$(find "$OUT_DIR" -type f | wc -l)
  echo "=== done in ${SECONDS}s: $files files in $OUT_DIR"
  ls -la "$OUT_DIR"
  cat "$OUT_DIR/summary.csv"
  if [ "$files" -gt 8 ]; then
    echo "gpu-check.sh: $files files in $OUT_DIR: the device tool brings back 8" >&2
    return 1
  fi
  # What a run whose every check passed writes (the header's list); a rehearsal must write it all.
  local f missing=()
  for f in gpu-check.log summary.csv parity.csv pipeline.csv vs-pytorch.csv latency.csv latency.table.json data-parallel.csv; do
    [ -s "$OUT_DIR/$f" ] || missing+=("$f")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu-check.sh: not written: ${missing[*]}" >&2
    $REHEARSAL && return 1
  fi
  return $FAILED
}

main 2>&1 | tee "$OUT_DIR/gpu-check.log"
exit "${PIPESTATUS[0]}"
