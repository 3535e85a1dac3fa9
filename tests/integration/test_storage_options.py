"""Per-root fsspec ``storage_options`` in storage.yaml, against a moto S3 server on 127.0.0.1 started here.

The server's endpoint is given only in storage.yaml (not in the environment): a cache written and read
through it proves the options reach zarr and fsspec. Secrets in storage.yaml are refused.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec.config
import numpy as np
import pytest
import yaml
import zarr

from seed import cache, storage
from seed.config import load_config, write_run_files
from seed.errors import SeedError
from seed.inspect import describe, verify
from seed.storage import Storage, join, load_storage, read_json, write_text
from tests.unit.test_inspect import make_cache

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@pytest.fixture()
def endpoint(s3_endpoint: str) -> str:
    return s3_endpoint


@pytest.fixture()
def env(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Credentials in the environment (where they belong), no endpoint there; a bucket made on the server."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    bucket = f"opts-{len(direct.ls(''))}"
    direct.mkdir(bucket)
    yield {"bucket": bucket}
    storage.activate(None)
    s3fs.S3FileSystem.clear_instance_cache()


def _storage_file(root: Path, endpoint: str, bucket: str) -> Path:
    opts = {"client_kwargs": {"endpoint_url": endpoint}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    path = root / "storage.yaml"
    path.write_text(yaml.safe_dump({
        "shards": "shards",
        "caches": {"url": f"s3://{bucket}/caches", "storage_options": opts},
        "runs": {"url": f"s3://{bucket}/runs", "storage_options": opts},
        "reports": "reports",
    }))
    return path


def test_a_cache_written_and_read_with_the_endpoint_only_in_storage_yaml(env: dict[str, str], endpoint: str,
                                                                         tmp_path: Path) -> None:
    import s3fs

    assert not any(os.environ.get(v) for v in ENDPOINT_VARIABLES)
    st = load_storage(str(_storage_file(tmp_path, endpoint, env["bucket"])))
    assert st.reports == str(tmp_path / "reports") and st.options_for(st.reports) == {}
    assert st.options_for(st.cache_url("x"))["client_kwargs"] == {"endpoint_url": endpoint}
    url = st.cache_url("opt")
    make_cache(url)                                    # cache.create, write_shard, finalize, the bank: zarr on S3
    local = make_cache(str(tmp_path / "local.zarr"))    # the same cache on disk, for reference
    g, ref = cache.open_complete(url), zarr.open_group(local, mode="r")
    for name in cache.ARRAYS:
        assert np.array_equal(g[name][:], ref[name][:], equal_nan=True), name
    assert np.array_equal(g["bank"]["logp"][:], ref["bank"]["logp"][:], equal_nan=True)
    info = describe(url)
    assert info["status"] == "complete" and info["rows"]["valid"] == describe(local)["rows"]["valid"]
    assert info["bytes"]["bank"]["stored"] > 0 and info["bytes"]["on_disk"] == info["bytes"]["cache"]["stored"] + info["bytes"]["bank"]["stored"]
    assert verify(url)["problems"] == []
    write_text(join(st.run_dir("r"), "note.json"), json.dumps({"ok": 1}))      # small files through seed.storage
    assert read_json(join(st.run_dir("r"), "note.json")) == {"ok": 1}
    # independently: the objects are on the moto server, seen by a client given the endpoint explicitly
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    assert direct.exists(f"{env['bucket']}/caches/opt.zarr/zarr.json")
    assert direct.exists(f"{env['bucket']}/caches/opt.zarr/bank/logp/zarr.json")
    assert direct.cat(f"{env['bucket']}/runs/r/note.json") == b'{"ok": 1}'
    # the CLI finds the options through $SEED_STORAGE: `seed inspect s3://...` with no endpoint in its environment
    child_env = {**os.environ, "SEED_STORAGE": str(tmp_path / "storage.yaml")}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", url, "--json"], cwd=ROOT, env=child_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes"]["cache"]["stored"] == info["bytes"]["cache"]["stored"]


def test_options_travel_to_processes_this_one_starts(env: dict[str, str], endpoint: str, tmp_path: Path) -> None:
    st = load_storage(str(_storage_file(tmp_path, endpoint, env["bucket"])))
    _, written = write_run_files(load_config(None), st, tmp_path)           # what torchrun ranks read
    again = load_storage(written)
    assert again == st and again.storage_options["caches"] == st.storage_options["caches"]
    storage.activate(None)
    assert "s3" not in fsspec.config.conf and storage.options_for(st.cache_url("x")) == {}
    unpickled = pickle.loads(pickle.dumps(st))                               # a Dask worker, say
    assert unpickled == st and storage.active() is unpickled
    assert fsspec.config.conf["s3"]["client_kwargs"] == {"endpoint_url": endpoint}
    assert storage.options_for(st.cache_url("x"))["client_kwargs"] == {"endpoint_url": endpoint}
    plain = Storage(shards="a", caches="b", runs="c", reports="d")            # a storage without options clears them
    assert storage.active() is plain and "s3" not in fsspec.config.conf


def _refused(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "storage.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SeedError) as info:
        load_storage(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("options, name", [
    ({"secret": "x"}, "secret"),
    ({"key": "AKIA..."}, "key"),
    ({"token": "abc"}, "token"),
    ({"client_kwargs": {"aws_secret_access_key": "x"}}, "client_kwargs.aws_secret_access_key"),
    ({"client_kwargs": {"aws_session_token": "x"}}, "client_kwargs.aws_session_token"),
    ({"account_key": "x"}, "account_key"),
    ({"password": "x"}, "password"),
    ({"headers": {"Authorization": "Bearer x"}}, "headers.Authorization"),
    ({"apikey": "x"}, "apikey"),
    ({"passphrase": "x"}, "passphrase"),
])
def test_secrets_in_storage_yaml_are_refused(tmp_path: Path, options: dict, name: str) -> None:
    message = _refused(tmp_path, {"caches": {"url": "s3://b/caches", "storage_options": options}})
    assert f"caches.storage_options.{name} looks like a secret" in message and "environment" in message


def test_a_password_in_a_root_url_is_refused(tmp_path: Path) -> None:
    assert "the caches root's URL holds a password" in _refused(tmp_path, {"caches": "https://user:pw@example.org/c"})


def test_other_mistakes_are_refused_naming_the_root(tmp_path: Path) -> None:
    assert "caches is a local path" in _refused(tmp_path, {"caches": {"url": "caches", "storage_options": {"anon": True}}})
    assert "roots caches and runs are both s3:// URLs with different storage_options" in _refused(tmp_path, {
        "caches": {"url": "s3://b/c", "storage_options": {"anon": True}}, "runs": "s3://b/r"})
    assert "storage root runs has unknown key(s) ['endpoint']" in _refused(tmp_path, {
        "runs": {"url": "s3://b/r", "endpoint": "http://x"}})
    assert "runs.storage_options must be a mapping" in _refused(tmp_path, {"runs": {"url": "s3://b/r", "storage_options": "anon"}})


def test_harmless_options_and_the_plain_form_load(tmp_path: Path) -> None:
    path = tmp_path / "storage.yaml"
    opts = {"anon": True, "profile": "team", "client_kwargs": {"endpoint_url": "http://x", "region_name": "eu"},
            "token": "anon"}
    path.write_text(yaml.safe_dump({"caches": {"url": "gs://b/c", "storage_options": opts}, "runs": "r"}))
    st = load_storage(str(path))
    try:
        assert st.caches == "gs://b/c" and st.runs == str(tmp_path / "r") and st.storage_options == {"caches": opts}
        assert st.options_for("gs://b/c/x.zarr/zarr.json") == opts and st.options_for("gs://b/cx") == {}
        assert fsspec.config.conf["gs"] == opts
    finally:
        storage.activate(None)
    assert "gs" not in fsspec.config.conf
