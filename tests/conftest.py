"""Shared fixtures: real Fashion-MNIST shards (converted once per session) and tiny teachers."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from seed.config import RunConfig, load_config
from seed.models import Encoder, mlp_encoder
from seed.shards import FASHION_MNIST_DIR, fashion_mnist_to_shards
from seed.storage import Storage
from seed.teachers import save_moco_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))

PER_SHARD = 100  # the full set becomes 600 train + 100 test shards; tests read the first few


@pytest.fixture(scope="session")
def fmnist_source() -> Path:
    src = Path(os.environ.get("SEED_FASHION_MNIST", FASHION_MNIST_DIR))
    if not (src / "train-images-idx3-ubyte.gz").exists() and not (src / "train-images-idx3-ubyte").exists():
        pytest.fail(f"Fashion-MNIST not found in {src}: run `make data` (apt-get install dataset-fashion-mnist)")
    return src


@pytest.fixture(scope="session")
def shards_root(tmp_path_factory: pytest.TempPathFactory, fmnist_source: Path) -> Path:
    """The whole of Fashion-MNIST as shards of 100 (``fm/train``, ``fm/test``): about 30 s once."""
    root = tmp_path_factory.mktemp("shards")
    fashion_mnist_to_shards(str(root / "fm"), source=str(fmnist_source), per_shard=PER_SHARD, progress=False)
    return root


def make_storage(root: Path, shards: Path) -> Storage:
    return Storage(shards=str(shards), caches=str(root / "caches"), runs=str(root / "runs"), reports=str(root / "reports"))


def tiny_encoder(arch: str = "resnet10t", dim: int = 32, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return mlp_encoder(arch, dim).eval()


@pytest.fixture(scope="session")
def moco_checkpoint(tmp_path_factory: pytest.TempPathFactory, shards_root: Path) -> Path:
    """A MoCo-v2-format checkpoint of a random resnet10t with a 32-d MLP head.

    The head's last bias centres its output on real images: a random network maps every image
    to nearly the same direction (cosine ~0.97), which would make SEED's task degenerate.
    """
    from seed.evaluate import images

    path = tmp_path_factory.mktemp("ckpt") / "moco.pth"
    encoder = tiny_encoder()
    batches, _ = images([str(shards_root / "fm" / "train" / "train-000099.tar")], 32)
    with torch.no_grad():
        encoder.head[-1].bias -= encoder(batches[0]).mean(dim=0)
    save_moco_checkpoint(encoder, path, arch="resnet10t")
    return path


def small_config(checkpoint: Path, *extra: str, shards: str = "fm/train/train-{000000..000002}.tar") -> RunConfig:
    """300 real images (3 shards of 100), 2 views at 32 px, the tiny teacher."""
    return load_config(None, [f"data.train={shards}", f"teacher.checkpoint={checkpoint}", "cache.views=2",
                              "cache.batch_size=64", "cache.cpu_threads=2", "cache.workers=1", "cache.name=test", *extra])


def cache_and_bank(root: Path, shards: Path, checkpoint: Path, *extra: str) -> tuple[RunConfig, Storage]:
    """A complete cache and bank over 300 real images (``small_config`` plus ``extra``) under ``root``."""
    import pipeline.bank as bank_stage
    import pipeline.teacher as teacher_stage

    storage = make_storage(root, shards)
    cfg = small_config(checkpoint, *extra)
    teacher_stage.run(cfg, storage, progress=False)
    bank_stage.run(cfg, storage, progress=False)
    return cfg, storage


def bench_script(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (the bench folder is scripts, not a package) as module ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for servers and rendezvous the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the session (stopped by its own process handle)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("moto S3 server did not start")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def flaky_url(path: Path, after: int | None = 1024) -> str:
    """``path`` as a ``flaky://`` URL: the local file, whose reads fail with ``ConnectionResetError`` once ``after``
    bytes were read (a connection to object storage reset mid-read; None: at once, as it is opened). An fsspec
    file system registered for it."""
    import io

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class Reset(io.RawIOBase):
        def __init__(self, inner: io.BufferedReader) -> None:
            self.inner = inner

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset: int, whence: int = 0) -> int:
            return self.inner.seek(offset, whence)

        def tell(self) -> int:
            return self.inner.tell()

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
            if after is not None and self.inner.tell() >= after:
                raise ConnectionResetError(104, "Connection reset by peer")
            data = self.inner.read(min(len(buffer), 512))
            buffer[: len(data)] = data
            return len(data)

    class Flaky(LocalFileSystem):
        protocol = ("flaky",)

        @classmethod
        def _strip_protocol(cls, path: str) -> str:  # type: ignore[override]
            return LocalFileSystem._strip_protocol(str(path).removeprefix("flaky://"))

        def _open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def]
            if after is None:
                raise ConnectionResetError(104, "Connection reset by peer")
            return io.BufferedReader(Reset(open(path, "rb")))

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    return f"flaky://{path}"
