"""Where things live and how small files are read and written, on local paths or fsspec URLs.

Roots come from ``storage.yaml``: local paths (relative ones resolve against the directory of
``storage.yaml``) or fsspec URLs such as ``s3://bucket/seed``. Credentials never go here: fsspec
reads them from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).

The path rules every stage shares are methods of ``Storage``: a cache is
``<caches>/<cache.name>.zarr``, a run is ``<runs>/<train.run>/`` with one sub-directory per student,
a made teacher is ``<runs>/<pretrain.name>/teacher.pth``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import fsspec
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

    def cache_url(self, name: str) -> str:
        """The teacher cache (a Zarr group) named ``name`` (``cache.name``)."""
        return self.resolve("caches", f"{name}.zarr")

    def run_dir(self, run: str) -> str:
        """The directory of a student run (``train.run``): config, report, one sub-directory per student."""
        return self.resolve("runs", run)

    def student_checkpoint(self, run: str, student: str) -> str:
        return join(self.run_dir(run), student, "checkpoint.pt")

    def teacher_scores(self, cache_name: str) -> str:
        """The teacher's evaluation scores, kept so a student-only re-run never loads the teacher."""
        return self.resolve("reports", f"{cache_name}-teacher-eval.json")

    def pretrained_teacher(self, name: str) -> str:
        """The teacher checkpoint made by pre-training run ``name`` (``pretrain.name``)."""
        return join(self.resolve("runs", name), "teacher.pth")

    def shard_lengths_record(self) -> str:
        """Samples per shard as counted once (``seed.shards.shard_lengths``), for shards without ``_info.json``.

        Under ``caches``: writable by every stage and shared by every process of this storage, where
        the shards themselves may be read-only.
        """
        return self.resolve("caches", "_shard_lengths.json")


def umask() -> int:
    """This process's file-creation mask, read from /proc on Linux (``os.umask`` can only read it by
    setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path, directory: bool = False) -> None:
    """Give a file or directory made private by ``tempfile`` the mode a plain create would have given it
    (0666 or 0777 less the umask), so a team sharing a runs or caches directory can read what it holds."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file to a local path or URL, creating its directory (one PUT on object stores)."""
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def read_json(url: str) -> Any:
    """The JSON document at ``url``, or None when there is none."""
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def exists(url: str) -> bool:
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    return bool(fs.exists(path))


def load_yaml(path: str | Path, kind: str) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is ``{}``); a clear error naming the file otherwise.

    ``kind`` names the file in messages: ``config file not found: run.yaml``.
    """
    p = Path(path)
    if not p.exists():
        raise SeedError(f"{kind} file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SeedError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise SeedError(f"{p}: expected a mapping at the top level of the {kind} file, got {type(data).__name__}")
    return data


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
    data = load_yaml(path, "storage") if path is not None else {}
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
