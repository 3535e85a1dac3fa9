"""A disk that fills up: the fsspec protocol ``fulldisk://`` is the local filesystem whose writes fail
with ``ENOSPC`` once a byte budget is spent, part-way through a write, under the storage layer.

In a test process: ``fsspec.register_implementation("fulldisk", FullDisk)`` and set ``FullDisk.budget``.
As a command, the ``seed`` CLI on a disk that fills after BUDGET bytes (roots in storage.yaml as
``fulldisk:///abs/path``)::

    python -m tests.integration.fulldisk BUDGET teacher -c run.yaml --storage storage.yaml
"""

from __future__ import annotations

import errno
import sys

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FullDisk(LocalFileSystem):
    protocol = ("fulldisk",)
    budget = 1 << 40

    def __init__(self, **kwargs: object) -> None:
        super().__init__(auto_mkdir=True, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:  # type: ignore[override]
        return LocalFileSystem._strip_protocol(str(path).removeprefix("fulldisk://"))

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> object:  # type: ignore[override]
        f = super()._open(path, mode, **kwargs)
        if "w" in mode or "a" in mode:
            write = f.write

            def limited(data: bytes) -> int:
                FullDisk.budget -= len(data)
                if FullDisk.budget < 0:
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                return write(data)

            f.write = limited  # this test's own file object, not project code
        return f


if __name__ == "__main__":
    from pipeline.cli import main

    fsspec.register_implementation("fulldisk", FullDisk, clobber=True)
    FullDisk.budget = int(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
