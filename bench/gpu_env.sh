# Sourced by the bench/gpu*.sh scripts on a borrowed GPU machine (python3 3.12 with torch, torchvision and
# timm preinstalled, no network): installs the wheels it lacks from the carried .whl/ folder (made by
# bench/gpu_wheels.sh) into $SITE, once per machine (the scripts that source it put $SITE on PYTHONPATH).
SITE="${GPU_SITE:-/tmp/site}"
if ! PYTHONPATH="$SITE" python3 -c "import zarr, numcodecs, webdataset, faiss, pytest" 2>/dev/null; then
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
        echo "pip install failed; unpacking the wheels by hand"
        mkdir -p "$SITE"
        for w in .whl/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
    fi
fi
export PYTHONUNBUFFERED=1
