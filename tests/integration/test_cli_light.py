"""The light commands (``seed --help``, ``--version``, ``seed config``) import neither torch nor Prefect: they
answer in a fraction of a second where importing torch alone takes seconds. A fresh interpreter each, since
the test process has imported both long before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from pipeline.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help and --version exit through argparse
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "prefect", "faiss")
                                                   if m in sys.modules)}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["config", "--template", "imagenet"],
                                  ["config", "-c", "configs/demo.yaml", "--set", "cache.views=4"], ["config", "--help"],
                                  ["student", "--help"], ["export", "--help"]])
def test_light_commands_import_neither_torch_nor_prefect(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), done.stderr
    assert report["heavy"] == [], f"seed {' '.join(argv)} imported {report['heavy']}"
    assert done.stdout.strip()  # it did print its page, version or config
