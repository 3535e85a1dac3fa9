#!/usr/bin/env bash
# One-shot GPU check on a borrowed machine (python3 3.12 + torch/torchvision/timm preinstalled, no network).
#
#   bash bench/gpu.sh            # from the repo root; results in $OUT (default /tmp/gpu-check-out)
#
# Needs the git-ignored .whl/ folder, made by bench/gpu_wheels.sh (zarr, numcodecs, webdataset and their small requirements as
# Python 3.12 wheels, plus fmnist-2048.npz): carry it to the machine with the working tree.
# Writes $OUT/gpu.log (everything printed), $OUT/gpu.json and $OUT/gpu.md (rewritten after every
# section, so a run cut short still leaves the figures it reached), $OUT/layouts.json, $OUT/workers.md,
# $OUT/jitter.md, $OUT/budget.md and $OUT/bank_writes.md.
# Extra arguments go to gpu_check.py. GPU_STEPS picks steps (below); GPU_<STEP>_TIMEOUT caps each.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check-out}"
# GPU_STEPS: which of the steps 3-9 below to run, space-separated (default: all, in this order), e.g.
# GPU_STEPS="tests budget workers". A name not among them stops the script before anything is installed.
ALL_STEPS="tests budget workers jitter layouts bankwrites check"
STEPS=" ${GPU_STEPS:-$ALL_STEPS} "
for step in $STEPS; do
    [[ " $ALL_STEPS " == *" $step "* ]] || { echo "GPU_STEPS: unknown step '$step' (steps: $ALL_STEPS)" >&2; exit 2; }
done
[[ -n "${STEPS// /}" ]] || { echo "GPU_STEPS names no step (steps: $ALL_STEPS)" >&2; exit 2; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
mkdir -p "$OUT"
LOG="$OUT/gpu.log"

# 1. The wheels the machine lacks, into $SITE (no index, no dependency resolution); skipped when a
#    previous command already installed them there.
: > "$LOG"
source bench/gpu_env.sh 2>&1 | tee -a "$LOG"   # (a subshell: what it exports is set again below)
SITE="${GPU_SITE:-/tmp/site}"
export PYTHONPATH="$SITE:$PWD"
export PYTHONUNBUFFERED=1

# 2. What we run on.
{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S') UTC, $(nproc) CPUs, $(hostname)"
    nvidia-smi -L || echo "nvidia-smi not available"
    echo "C compiler (Triton builds its launcher with it): $(command -v cc gcc | head -1 || true)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
    python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "torchvision", "timm", "numpy", "PIL", "fsspec", "yaml", "zarr", "numcodecs", "webdataset",
          "donfig", "msgspec", "google_crc32c", "braceexpand", "faiss", "triton"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}  {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"{m} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
import os, sysconfig
print("Python.h (Triton's launcher needs it):", os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
} 2>&1 | tee -a "$LOG"

rc=0

# 3. tests: the unit tests that only run on CUDA (skipped on the CPU machines): the teacher forward as a CUDA
#    graph, the bank's targets on the GPU, the augmentation kernels against the CPU path.
if want tests; then
    timeout -k 10 "${GPU_TESTS_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/unit/test_teacher_forward.py "tests/unit/test_bank.py::test_cuda_targets_equal_cpu" \
        "tests/unit/test_bank.py::test_cuda_bank_logits_stay_ieee_float32_when_the_process_asks_for_tf32" \
        "tests/unit/test_bank.py::test_a_flat_bank_on_cuda_gives_the_targets_of_the_torch_bank" \
        "tests/unit/test_augment.py::test_augmentation_kernels_give_the_cpu_paths_views_on_cuda" 2>&1 | tail -15 | tee -a "$LOG"
    echo "== tests exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
# 4. budget: the GPU's own budget: GPU time of nvJPEG, apply_batch (both jitter modes; the sequential one also
#    with fused_augment, crops and jitter as Triton kernels) and the forward for one
#    batch, and the ceiling of stage / pure forward they allow when they run one after another on the one GPU.
if want budget; then
    timeout -k 10 "${GPU_BUDGET_TIMEOUT:-120}" python3 bench/gpu_budget.py > "$OUT/budget.md" 2>&1
    echo "== budget exit status $?" >> "$OUT/budget.md"
    tee -a "$LOG" < "$OUT/budget.md"
fi
# 5. workers: what holds the teacher stage back (runs 10-13 of docs/benchmarks.md: the data thread; the forward
#    waits for its input). At ImageNet's shard size (about 1,000 images), 3 rounds taking turns, the jitter as
#    torch operations (over a thousand aten operations per batch from the data thread) and as Triton kernels
#    (cache.fused_augment). And 2 and 4 processes sharing the GPU (seed
#    teacher --procs), each with its own data thread and interpreter lock: on an H200 at V = 8 (run 5) they reached
#    0.9 of one process, before the decoder's stream and the CUDA graph; at V = 2 the data thread carries 4x the
#    images. The table gives the forward's wait for input per run.
if want workers; then
    timeout -k 10 "${GPU_WORKERS_TIMEOUT:-330}" python3 bench/gpu_workers.py --copies 4 --per-shard 1024 --workers 4 0 \
        --variant cache.fused_augment=false --variant cache.fused_augment=true --procs 2 4 --rounds 3 > "$OUT/workers.md" 2>&1
    echo "== workers exit status $?" >> "$OUT/workers.md"
    grep -E "^== " "$OUT/workers.md" | tee -a "$LOG"
    grep -E "^\| [0-9]|pure" "$OUT/workers.md" | tee -a "$LOG"
fi
# 6. jitter: the two jitter modes' colour stage, kernel time per 256 views at 224 px.
if want jitter; then
    timeout -k 10 "${GPU_JITTER_TIMEOUT:-90}" python3 bench/jitter_modes.py --device cuda > "$OUT/jitter.md" 2>&1
    echo "== jitter exit status $?" >> "$OUT/jitter.md"
    tail -13 "$OUT/jitter.md" | tee -a "$LOG"
fi
# 7. layouts: do process layouts give the same cache on this GPU (view by view, and every view replayed)? With
#    the augmentation kernels (the tensor path's layouts were byte-identical in runs 5-9), and a student
#    replaying them with the tensor path.
if want layouts; then
    timeout -k 10 "${GPU_LAYOUTS_TIMEOUT:-150}" python3 bench/gpu_layouts.py --out "$OUT" --set cache.fused_augment=true 2>&1 | grep -v Warning | tail -40 | tee -a "$LOG"
    echo "== layouts exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
# 8. bankwrites: the bank stage at ImageNet's widths (K = 65,536, top-k 4,096, D = 2,048; V = 2, 56 shards of
#    random embeddings) with each block of targets written behind the next block's computation and before it,
#    two builds each: is the stage the writes' pace on a GPU, and how much of it the writing behind hides.
#    GPU_BANKWRITES_ARGS: other sizes (a dry run on a CPU: --shards 4 --capacity 1100 --dim 128 --bank 4096).
if want bankwrites; then
    # shellcheck disable=SC2086
    timeout -k 10 "${GPU_BANKWRITES_TIMEOUT:-240}" python3 bench/bank_writes.py --scratch /tmp/seed-bank-writes \
        ${GPU_BANKWRITES_ARGS:-} > "$OUT/bank_writes.md" 2>&1
    echo "== bankwrites exit status $?" >> "$OUT/bank_writes.md"
    tail -12 "$OUT/bank_writes.md" | tee -a "$LOG"
fi
# 9. check: the whole check, last, with what is left of the call (its own guard skips heavy sections after
#    --guard seconds): the new figures above come back even when this one is cut short.
if want check; then
    timeout -k 10 "${GPU_CHECK_TIMEOUT:-240}" python3 bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "== gpu_check.py exit status $rc" | tee -a "$LOG"
    [ -f "$OUT/gpu.md" ] && grep -v "^| _meta" "$OUT/gpu.md" | head -220
fi
exit "$rc"
