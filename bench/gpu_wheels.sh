#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu.sh needs on a GPU machine that has Python 3.12, torch,
# torchvision, timm, numpy and pillow but no network: zarr, numcodecs, webdataset, faiss-cpu and their small
# requirements, and pytest for the CUDA-only unit tests, as Python 3.12 wheels, and the first 2,048 Fashion-MNIST training images (npz).
#   bash bench/gpu_wheels.sh          # from the repo root, on a machine that reaches PyPI
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for pkg in zarr==3.4.2 numcodecs==0.17.1 webdataset==1.0.2 donfig==0.8.1.post1 google-crc32c==1.9.0 msgspec==0.22.0 \
           braceexpand==0.1.7 typing_extensions==4.16.0 packaging==26.4 faiss-cpu==1.15.1 \
           pytest==9.0.2 pluggy==1.6.0 iniconfig==2.3.0 pygments==2.21.0; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl "$pkg"
done
"$PY" - <<'PY'
import numpy as np
from seed.shards import FASHION_MNIST_DIR, load_fashion_mnist
images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "train", 2048)
np.savez_compressed(".whl/fmnist-2048.npz", images=images, labels=labels)
PY
du -sh .whl
