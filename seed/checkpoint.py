"""Checkpoints written atomically (temp file, then rename or single PUT) on local paths or fsspec URLs."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import torch

from seed.errors import SeedError
from seed.storage import is_url, local_path


def save(obj: Any, url: str) -> None:
    """Write ``obj`` with ``torch.save`` so that ``url`` holds either the old or the new file, never half."""
    if is_url(url):
        buf = io.BytesIO()
        torch.save(obj, buf)
        with fsspec.open(url, "wb") as f:  # object stores PUT whole objects
            f.write(buf.getvalue())
        return
    path = Path(local_path(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(url: str) -> bool:
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    return bool(fs.exists(path))


def load(url: str) -> dict[str, Any]:
    """A checkpoint written by ``save`` (plain tensors and containers: ``weights_only=True``)."""
    try:
        with fsspec.open(url, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise SeedError(f"checkpoint not found: {url}") from exc
    except Exception as exc:
        raise SeedError(f"{url}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
