#!/usr/bin/env bash
# Before and after a change, on one borrowed GPU in one call: the data-path checks run on two trees, the
# commit before the change and this working tree, so the figures compare on the same machine (machines of
# one kind differ by about 30 % here).
#
#   git archive BASE | (mkdir -p .before && tar -x -C .before)     # here; .before is git-ignored
#   bash bench/gpu_before_after.sh .before                          # there, with carry [".whl", ".before"]
#
# Writes $OUT/before/ and $OUT/after/ (gpu.json, gpu.md of bench/gpu_check.py sections a-d, f-h;
# workers.txt of bench/gpu_workers.py), then for this tree alone $OUT/layouts.json (bench/gpu_layouts.py:
# do process layouts still give the same cache?) and $OUT/profile.txt (bench/gpu_profile.py).
# GPU_SMOKE=1 runs everything at the scripts' smoke sizes (on the CPU, to test this script). Each step's time
# limit can be set (seconds): GPU_TESTS_TIMEOUT (the CUDA-only unit tests of this tree, first), GPU_CHECK_TIMEOUT,
# GPU_WORKERS_TIMEOUT (per side), GPU_LAYOUTS_TIMEOUT, GPU_PROFILE_TIMEOUT (0 skips the profile).
set -uo pipefail
cd "$(dirname "$0")/.."
BEFORE="${1:?usage: bench/gpu_before_after.sh BEFORE_TREE}"
OUT="${OUT:-/tmp/gpu-before-after}"
HERE="$PWD"
source bench/gpu_env.sh
smoke=(); workers=(0 4)
if [ -n "${GPU_SMOKE:-}" ]; then smoke=(--smoke); workers=(0); fi
nvidia-smi -L 2>/dev/null || echo "no GPU"
PYTHONPATH="$SITE:$HERE" timeout -k 5 "${GPU_TESTS_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/unit/test_teacher_forward.py 2>&1 | tail -3
for side in before after; do
    tree="$HERE"; [ "$side" = before ] && tree="$(cd "$BEFORE" && pwd)"
    mkdir -p "$OUT/$side"
    echo "== $side: $tree"
    (cd "$tree" && PYTHONPATH="$SITE:$tree" timeout -k 5 "${GPU_CHECK_TIMEOUT:-120}" python3 bench/gpu_check.py "${smoke[@]}" --only a,b,c,d,f,g,h \
        --data "$HERE/.whl/fmnist-2048.npz" --out "$OUT/$side" 2>&1 \
        | grep -E "views_per_s|stage_over_pure|ms_per_step|over_bare|host_syncs|queue_ms|gpu =|error|Error" | grep -v "^  [a-z_]*\.error = none")
    (cd "$tree" && PYTHONPATH="$SITE:$tree" timeout -k 5 "${GPU_WORKERS_TIMEOUT:-90}" python3 bench/gpu_workers.py "${smoke[@]}" --copies 4 \
        --workers "${workers[@]}" --data "$HERE/.whl/fmnist-2048.npz" > "$OUT/$side/workers.txt" 2>&1)
    tail -7 "$OUT/$side/workers.txt"
done
export PYTHONPATH="$SITE:$HERE"
if [ -z "${GPU_SMOKE:-}" ]; then
    timeout -k 5 "${GPU_LAYOUTS_TIMEOUT:-120}" python3 bench/gpu_layouts.py --out "$OUT" 2>&1 | grep -E "identical|under_0.999" | sort | uniq -c
    [ "${GPU_PROFILE_TIMEOUT:-60}" != 0 ] && timeout -k 5 "${GPU_PROFILE_TIMEOUT:-60}" python3 bench/gpu_profile.py --out "$OUT" 2>&1 | head -3
fi
ls -la "$OUT" "$OUT"/*
