"""The whole of Fashion-MNIST converted to shards matches the Debian package's idx files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from seed.shards import decode_image, iter_shard, load_fashion_mnist


def test_full_fashion_mnist_matches_source(shards_root: Path, fmnist_source: Path) -> None:
    info = json.loads((shards_root / "fm" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 60_000
    assert info["splits"]["test"]["num_samples"] == 10_000
    assert len(list((shards_root / "fm" / "train").glob("*.tar"))) == 600
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = load_fashion_mnist(fmnist_source, split)
        rng = np.random.default_rng(0)
        for i in rng.choice(n, size=25, replace=False):
            url = str(shards_root / "fm" / split / f"{split}-{i // 100:06d}.tar")
            sample = next(s for s in iter_shard(url) if s.index == i % 100)
            assert sample.key == f"fmnist-{split}-{i:06d}" and sample.label == labels[i]
            pixels = decode_image(sample)
            assert pixels.shape == (3, 28, 28)
            assert np.array_equal(pixels[0].numpy(), images[i])


def test_an_interrupted_conversion_publishes_nothing_and_says_so(tmp_path: Path, fmnist_source: Path) -> None:
    """Ctrl-C in ``seed shards`` (SIGINT once its build directory is there): exit code 130, one line saying that
    nothing was published, and neither the output nor the build directory left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "shards", "fashion-mnist", "--source",
                             str(fmnist_source), "--per-shard", "100", "--out", str(tmp_path / "fm")],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(".seed-shards-*/train/*.tar")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("seed: interrupted; nothing complete was published (shards appear once "
                                            "all are written); re-run to convert"), err
    assert list(tmp_path.iterdir()) == []
