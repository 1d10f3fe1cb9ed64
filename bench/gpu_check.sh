#!/usr/bin/env bash
# Every GPU figure flux-npu needs, in one run, written under one output directory.
#
#   bench/gpu_check.sh [OUT_DIR] [--only STEPS] [--skip STEPS] [--quick] [--dry-run]
#
# Run from anywhere on an NVIDIA GPU host, offline. It uses the repository it sits in (no
# install of flux-npu: PYTHONPATH points at the checkout). When diffusers does not import, it
# installs diffusers and importlib_metadata from the wheels the lead carries in wheels/
# (pip install --no-index --find-links wheels ...) and stops with a clear message if they are
# missing. Each step runs even if an earlier one failed; its output goes to OUT_DIR/<step>.txt
# and its exit status to OUT_DIR/summary.md. Steps (names for --only / --skip, comma separated):
#
#   env        nvidia-smi, versions, SDPA flags                          -> env.txt
#   tests      the README test command's Triton/CUDA tests on the GPU    -> tests-cuda.txt
#   suite      the full test suite (python -m pytest -q)                 -> suite.txt
#   parity     the shipped CPU golden checked on cuda (cuDNN SDPA off, the suite's default),
#              and once more with cuDNN SDPA allowed (diagnostic: shows the torch 2.11 bug)
#                                                                        -> parity-cpu-on-cuda*.json
#   record     a CUDA golden: tests/golden/parity_cuda.safetensors (tiny,width, like the CPU one),
#              then checked on cpu                                       -> parity-cuda-on-cpu.json
#   ops        bench ops at Flux-dev shapes, device time and latency     -> ops-cuda.json
#   model      bench model flux-mini 512/1024, infer+train lora/full, stock vs patched, --isolate,
#              eager                                                     -> model-eager.json/.log/.png
#   compile    the same with torch.compile of stock and patched          -> model-compile.json/.log/.png
#   verify     flux-npu verify --backend cuda                            -> verify/
#
# --quick: fewer repeats and steps (a smoke run of every step). --dry-run: print the commands.
# Device-time budget: a lent GPU allows 10 minutes per command, so on such a machine run it in
# pieces into the same OUT_DIR, e.g. --only env,tests,parity,record then --only suite, --only ops,
# --only model, --only compile, --only verify. RES="512" (or "1024") limits the model and compile
# steps to one resolution (default "512 1024"; each run writes model-<step>-<res>.json then).
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
ALL_STEPS="env tests suite parity record ops model compile verify"

OUT=""
ONLY=""
SKIP=""
QUICK=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="${2:?--only needs a list of steps}"; shift 2 ;;
    --skip) SKIP="${2:?--skip needs a list of steps}"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n "2,31p" "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
OUT="${OUT:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}"

for s in ${ONLY//,/ } ${SKIP//,/ }; do
  case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_check.sh: unknown step '$s'; steps: $ALL_STEPS" >&2; exit 2 ;; esac
done

wanted() {
  local s="$1"
  if [ -n "$ONLY" ]; then case ",$ONLY," in *",$s,"*) ;; *) return 1 ;; esac; fi
  case ",$SKIP," in *",$s,"*) return 1 ;; esac
  return 0
}

PY="${PYTHON:-python}"
FLUX="$PY -m flux_npu"
if [ "$QUICK" = 1 ]; then
  MODEL_ARGS="--steps 5 --train-steps 1 --repeats 2"
  OPS_ARGS="--repeats 10 --warmup 3"
else
  MODEL_ARGS="--repeats 5"
  OPS_ARGS=""
fi

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT"
  OUT="$(cd "$OUT" && pwd)"
fi
SUMMARY="$OUT/summary.md"
if [ "$DRY" = 0 ] && [ ! -f "$SUMMARY" ]; then
  printf '# bench/gpu_check.sh\n\n| step | exit | seconds | started (UTC) | output |\n|---|---:|---:|---|---|\n' > "$SUMMARY"
fi

# step NAME OUTPUT_FILE COMMAND...: run (or print) one command, log it, record its status
step() {
  local name="$1" log="$2"; shift 2
  if [ "$DRY" = 1 ]; then
    echo "[$name] $*"
    return 0
  fi
  local t0 start rc
  t0=$(date +%s); start=$(date -u +%H:%M:%S)
  echo "== [$name] $*" | tee -a "$OUT/$log"
  ( cd "$REPO" && "$@" ) >> "$OUT/$log" 2>&1
  rc=$?
  echo "   exit $rc after $(( $(date +%s) - t0 )) s (log: $log)"
  echo "| $name | $rc | $(( $(date +%s) - t0 )) | $start | $log |" >> "$SUMMARY"
  return 0
}

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# -- prerequisites ------------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to torch ($PY); this script is for a GPU host" >&2
    exit 1
  fi
  if ! "$PY" -c "import diffusers, importlib_metadata" 2>/dev/null; then
    if ! ls "$REPO"/wheels/diffusers-*.whl >/dev/null 2>&1; then
      echo "gpu_check.sh: diffusers is not installed and there is no wheel for it in $REPO/wheels/." >&2
      echo "  Bring the wheels (pip download diffusers importlib_metadata -d wheels, on a machine with network)" >&2
      echo "  or install diffusers yourself, then run this again." >&2
      exit 1
    fi
    echo "installing diffusers and importlib_metadata from $REPO/wheels (offline)"
    if ! "$PY" -m pip install --no-index --find-links "$REPO/wheels" diffusers importlib_metadata; then
      echo "gpu_check.sh: pip could not install diffusers from $REPO/wheels (a dependency wheel missing?)" >&2
      exit 1
    fi
  fi
  # tabulate renders every text table (a core dependency since issue 19); the GPU image may lack it
  if ! "$PY" -c "import tabulate" 2>/dev/null; then
    if ! "$PY" -m pip install --no-index --find-links "$REPO/wheels" tabulate; then
      echo "gpu_check.sh: tabulate is not installed and not in $REPO/wheels/ (pip download tabulate -d wheels)" >&2
      exit 1
    fi
  fi
  if ! "$PY" -c "import matplotlib" 2>/dev/null; then
    echo "note: matplotlib is not installed: no PNG plots (every figure is still in the JSON files)"
  fi
fi
PLOT_EAGER=""
PLOT_COMPILE=""
if [ "$DRY" = 1 ] || "$PY" -c "import matplotlib" 2>/dev/null; then
  PLOT_EAGER="--plot $OUT/model-eager.png"
  PLOT_COMPILE="--plot $OUT/model-compile.png"
fi

# -- steps --------------------------------------------------------------------------------------
if wanted env; then
  step env env.txt sh -c "nvidia-smi; $PY -c 'import torch, platform; from flux_npu.utils.versions import versions; \
print(platform.platform()); print(versions()); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability()); \
print(\"cudnn\", torch.backends.cudnn.version(), \"sdpa flash/mem_eff/cudnn/math:\", \
torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(), \
torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())'; $FLUX info --backend cuda"
fi
if wanted tests; then
  step tests tests-cuda.txt $PY -m pytest -q tests/test_triton_kernels.py tests/test_cuda_backend.py \
    tests/ops --junitxml "$OUT/tests-cuda.xml"
fi
if wanted suite; then
  step suite suite.txt $PY -m pytest -q --junitxml "$OUT/suite.xml"
fi
if wanted parity; then
  step parity parity.txt $FLUX parity check tests/golden/parity_cpu.safetensors --backend cuda --all-tensors \
    -o "$OUT/parity-cpu-on-cuda.json"
  step parity-cudnn parity-cudnn.txt $FLUX parity check tests/golden/parity_cpu.safetensors --backend cuda \
    --allow-cudnn-sdpa --all-tensors -o "$OUT/parity-cpu-on-cuda-cudnn.json"
fi
if wanted record; then
  step record record.txt $FLUX parity record --backend cuda --shapes tiny width -o tests/golden/parity_cuda.safetensors
  step record-check record.txt $FLUX parity check tests/golden/parity_cuda.safetensors --backend cpu \
    -o "$OUT/parity-cuda-on-cpu.json"
  if [ "$DRY" = 0 ] && [ -f "$REPO/tests/golden/parity_cuda.safetensors" ]; then
    cp "$REPO/tests/golden/parity_cuda.safetensors" "$OUT/"
    # the wheel ships goldens from flux_npu/data/golden, links to tests/golden (one file, two paths)
    if [ -d "$REPO/flux_npu/data/golden" ] && [ ! -e "$REPO/flux_npu/data/golden/parity_cuda.safetensors" ]; then
      ln -s ../../../tests/golden/parity_cuda.safetensors "$REPO/flux_npu/data/golden/parity_cuda.safetensors"
    fi
  fi
fi
if wanted ops; then
  step ops ops.txt $FLUX bench ops --backend cuda --shapes dev --dtypes bf16 fp16 fp32 $OPS_ARGS --no-progress \
    -o "$OUT/ops-cuda.json"
fi
RES="${RES:-512 1024}"
TAG=""
[ "$RES" = "512 1024" ] || TAG="-${RES// /-}"
if [ -n "$TAG" ] && [ -n "$PLOT_EAGER" ]; then
  PLOT_EAGER="--plot $OUT/model-eager$TAG.png"
  PLOT_COMPILE="--plot $OUT/model-compile$TAG.png"
fi
MODEL="$FLUX bench model --backend cuda --preset flux-mini --res $RES --mode both --train lora full --compare \
--isolate $MODEL_ARGS --no-progress"
if wanted model; then
  step model "model$TAG.txt" $MODEL -o "$OUT/model-eager$TAG.json" $PLOT_EAGER
fi
if wanted compile; then
  step compile "compile$TAG.txt" $MODEL --compile -o "$OUT/model-compile$TAG.json" $PLOT_COMPILE
fi
if wanted verify; then
  step verify verify.txt $FLUX verify --backend cuda -o "$OUT/verify" $([ "$QUICK" = 1 ] && echo --quick)
fi

if [ "$DRY" = 0 ]; then
  echo
  cat "$SUMMARY"
  echo
  echo "everything is under $OUT; send it back with: tar czf $OUT.tar.gz -C $(dirname "$OUT") $(basename "$OUT")"
  echo "and, if the record step ran, commit tests/golden/parity_cuda.safetensors and its link"
  echo "flux_npu/data/golden/parity_cuda.safetensors"
fi
