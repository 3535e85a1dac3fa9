"""Storage roots from ``storage.yaml``: where shards, caches, runs and reports live.

Roots are local paths (relative ones resolve against the directory of ``storage.yaml``) or fsspec
URLs such as ``s3://bucket/seed``. Credentials never go here: fsspec reads them from the
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from seed.errors import SeedError

ROOTS = ("shards", "caches", "runs", "reports")


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path.removeprefix("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclasses.dataclass(frozen=True)
class Storage:
    shards: str
    caches: str
    runs: str
    reports: str

    def resolve(self, root: str, path: str) -> str:
        """``path`` under the named root, unless it is already absolute or a URL."""
        if root not in ROOTS:
            raise SeedError(f"unknown storage root {root!r} (known: {', '.join(ROOTS)})")
        if is_url(path) or os.path.isabs(local_path(path)):
            return path
        return join(getattr(self, root), path)


def find_storage_file(explicit: str | None = None) -> Path | None:
    """``explicit``, else ``$SEED_STORAGE``, else ``./storage.yaml``, else None (built-in defaults)."""
    for candidate in (explicit, os.environ.get("SEED_STORAGE"), "storage.yaml"):
        if candidate:
            p = Path(candidate)
            if p.exists():
                return p.absolute()
            if candidate is not None and candidate != "storage.yaml":
                raise SeedError(f"storage file not found: {p}")
    return None


def load_storage(explicit: str | None = None) -> Storage:
    path = find_storage_file(explicit)
    base = path.parent if path else Path.cwd()
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SeedError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise SeedError(f"{path}: expected a mapping of roots ({', '.join(ROOTS)})")
    unknown = set(data) - set(ROOTS)
    if unknown:
        raise SeedError(f"{path}: unknown storage root(s) {sorted(unknown)} (known: {', '.join(ROOTS)})")
    roots = {}
    for name in ROOTS:
        value = data.get(name, f"data/{name}")
        if not isinstance(value, str) or not value:
            raise SeedError(f"{path}: storage root {name} must be a path or URL string, got {value!r}")
        roots[name] = value if is_url(value) or os.path.isabs(value) else str((base / value).resolve())
    return Storage(**roots)
