"""The pipeline with an s3:// cache and run root, against a moto S3 server on 127.0.0.1 started here.

Credentials and the endpoint come from the environment only (as fsspec/s3fs read them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

import pipeline.bank as bank_stage
import pipeline.evaluate as evaluate_stage
import pipeline.student as student_stage
import pipeline.teacher as teacher_stage
from seed import checkpoint
from seed.inspect import describe
from seed.storage import Storage
from tests.conftest import small_config


@pytest.fixture()
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import fsspec
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3").mkdir("seed-test")
    return "s3://seed-test"


def test_pipeline_on_s3(s3_env: str, shards_root: Path, moco_checkpoint: Path) -> None:
    import fsspec

    storage = Storage(shards=str(shards_root), caches=f"{s3_env}/caches", runs=f"{s3_env}/runs", reports=f"{s3_env}/reports")
    cfg = small_config(moco_checkpoint, "bank.size=64", "bank.topk=8", "train.optim.batch_size=50", "train.optim.epochs=1",
                       "data.test=fm/test/test-000000.tar")
    summary = teacher_stage.run(cfg, storage, progress=False)
    url = summary.cache
    assert url == "s3://seed-test/caches/test.zarr" and summary.totals is not None and summary.totals["teacher_forwards"] == 600
    group = zarr.open_group(url, mode="r")
    assert group.attrs["status"] == "complete" and group["embeddings"].shape == (300, 2, 32)
    bank_stage.run(cfg, storage, progress=False)
    trained = student_stage.run(cfg, storage, progress=False)
    assert checkpoint.load(trained.students["mobilenetv3_small_050"])["epoch"] == 1
    report = evaluate_stage.run(cfg, storage, progress=False).report
    fs = fsspec.filesystem("s3")
    assert report.startswith("s3://") and fs.exists(report) and fs.exists(report.replace("report.md", "accuracy.png"))
    info = describe(url)
    assert info["bytes"]["on_disk"] > 0 and info["shards"] == {"done": 3, "total": 3}
    assert not any(k.startswith("AWS") for k in str(group.attrs.asdict()))  # no credentials in the cache


def test_no_credentials_for_object_storage_is_one_line(s3_endpoint: str) -> None:
    """``seed inspect s3://...`` with no credentials anywhere boto looks: one line saying where to give them,
    exit 2 (before, botocore's traceback of about 80 lines, exit 1)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", "s3://seed-test/caches/x.zarr"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "seed: error: object storage: Unable to locate credentials (botocore NoCredentialsError); give credentials "
        "as boto does (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or storage_options in "
        "storage.yaml)"], out.stderr
