"""Object storage: a Zarr v3 store written and read through a local S3-compatible server.

The server is moto's, on loopback, spoken to through s3fs/botocore exactly as a real bucket
would be; only the endpoint (``AWS_ENDPOINT_URL``) and the dummy credentials differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline import layout, storage
from pipeline.demo.isolated import TEST_SECRET_KEY, s3_server
from pipeline.errors import StoreError

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "ssl4eo-test"
FAKE_SECRET = TEST_SECRET_KEY


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port) with one bucket; env points clients at it."""
    with s3_server(BUCKET) as info:
        yield info["endpoint"]


def _s3fs_clear() -> None:
    """Forget cached s3fs instances so that each open really talks to the server again."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


# ------------------------------------------------------------------------------- pure helpers
def test_scheme_and_join() -> None:
    assert storage.scheme("demo-output/cube.zarr") == ""
    assert storage.scheme("file:///tmp/cube.zarr") == ""
    assert storage.scheme("s3://bucket/cube.zarr") == "s3"
    assert storage.scheme("az://container/cube.zarr") == "az"
    assert storage.scheme("C:\\data\\cube.zarr") == ""
    assert storage.join("s3://b/cube.zarr/", "S2L2A", "bands") == "s3://b/cube.zarr/S2L2A/bands"
    assert storage.join("/tmp/x", "S2L2A").endswith("/tmp/x/S2L2A")
    assert str(storage.local_path("file:///tmp/c.zarr")) == "/tmp/c.zarr"


def test_env_options_are_not_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    opts = storage.storage_options_for(
        "s3://b/c.zarr", {"client_kwargs": {"verify": False}, "anon": False}
    )
    assert opts == {
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-central-1", "verify": False},
        "anon": False,
    }
    assert FAKE_SECRET not in repr(opts)  # secrets stay with the client library
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
    assert storage.storage_options_for("az://cont/c.zarr") == {"account_name": "acct"}


def test_redact_masks_secrets() -> None:
    red = storage.redact(
        {"key": "AKIA123", "secret": FAKE_SECRET, "endpoint_url": "http://u:pw@h:9/x?sig=abc&a=1",
         "client_kwargs": {"aws_session_token": "sess-val-9"}, "anon": False}
    )
    text = repr(red)
    for secret in ("AKIA123", FAKE_SECRET, "pw", "abc", "sess-val-9"):
        assert secret not in text
    assert "a=1" in red["endpoint_url"] and "h:9" in red["endpoint_url"]


def test_bad_urls_are_user_errors(tmp_path) -> None:
    with pytest.raises(StoreError, match="ftp"):
        storage.open_store("ftp://host/cube.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        storage.open_store(tmp_path / "nope.zarr", mode="r")
    with pytest.raises(StoreError, match="only be read"):
        storage.open_store("https://example.org/cube.zarr", mode="w")


# ------------------------------------------------------------------------- through the server
def _write_sharded(url: str) -> np.ndarray:
    """A small store in the layout's chunking: bands sharded by SHARD_SAMPLES-like blocks."""
    import zarr

    rng = np.random.default_rng(0)
    data = rng.integers(1, 10_000, size=(6, 4, 2, 8, 8), dtype=np.uint16)
    root = zarr.open_group(storage.open_store(url, mode="w"), mode="w", zarr_format=3)
    root.attrs[layout.ATTR_SCHEMA] = layout.SCHEMA_VERSION
    grp = root.create_group(layout.S2L2A)
    arr = grp.create_array(
        "bands", shape=data.shape, dtype="uint16", chunks=(1, 1, 2, 8, 8),
        shards=(3, 4, 2, 8, 8), fill_value=0, dimension_names=("sample", "time", "band", "y", "x"),
    )
    arr[0:3] = data[0:3]  # one whole shard per write, as the builder does
    arr[3:6] = data[3:6]
    root.create_array("status", shape=(6,), dtype="uint8", chunks=(6,), fill_value=0)
    return data


def test_sharded_write_read_consolidate(s3_endpoint: str) -> None:
    import s3fs
    import xarray as xr
    import zarr

    url = f"s3://{BUCKET}/roundtrip/cube.zarr"
    data = _write_sharded(url)
    # the objects really are in the bucket, one per shard
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    keys = fs.find(f"{BUCKET}/roundtrip/cube.zarr/S2L2A/bands")
    chunk_keys = [k for k in keys if not k.endswith("zarr.json")]
    assert len(chunk_keys) == 2, keys  # two shards, not 24 chunk objects
    assert storage.store_exists(url)

    zarr.consolidate_metadata(storage.open_store(url, mode="a"))
    _s3fs_clear()
    ro = storage.open_store(url, mode="r")
    assert ro.read_only
    root = zarr.open_group(ro, mode="r", use_consolidated=True)
    assert root.attrs[layout.ATTR_SCHEMA] == layout.SCHEMA_VERSION
    np.testing.assert_array_equal(root[f"{layout.S2L2A}/bands"][:], data)
    with pytest.raises(Exception):  # noqa: B017 - zarr's read-only error type varies
        root[f"{layout.S2L2A}/bands"][0] = 1

    ds = xr.open_zarr(storage.open_store(url), group=layout.S2L2A, consolidated=False)
    assert ds.bands.dims == ("sample", "time", "band", "y", "x")
    np.testing.assert_array_equal(ds.bands.isel(sample=4).values, data[4])

    storage.remove_store(url)
    assert not storage.store_exists(url)


def test_resume_state_survives_reopen(s3_endpoint: str) -> None:
    """Resume = the root ``status`` array: written per shard, read back by a new process-like
    open (fresh filesystem instance), and only pending samples are written again."""
    import zarr

    url = f"s3://{BUCKET}/resume/cube.zarr"
    data = _write_sharded(url)
    root = zarr.open_group(storage.open_store(url, mode="a"), mode="a")
    status = root["status"]
    status[0:3] = layout.STATUS_CODES["complete"]  # first shard done, then "interrupted"
    status[3:6] = layout.STATUS_CODES["pending"]
    del root

    _s3fs_clear()
    root = zarr.open_group(storage.open_store(url, mode="a"), mode="a")
    todo = np.flatnonzero(root["status"][:] != layout.STATUS_CODES["complete"])
    assert todo.tolist() == [3, 4, 5]
    root[f"{layout.S2L2A}/bands"][3:6] = data[3:6] + 1
    root["status"][3:6] = layout.STATUS_CODES["complete"]

    _s3fs_clear()
    again = zarr.open_group(storage.open_store(url), mode="r")
    assert (again["status"][:] == layout.STATUS_CODES["complete"]).all()
    np.testing.assert_array_equal(again[f"{layout.S2L2A}/bands"][:3], data[:3])
    np.testing.assert_array_equal(again[f"{layout.S2L2A}/bands"][3:], data[3:] + 1)


def test_secrets_never_logged(s3_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    import zarr

    caplog.set_level(logging.DEBUG, logger="pipeline")
    url = f"s3://{BUCKET}/logged/cube.zarr"
    zarr.open_group(
        storage.open_store(url, mode="w", storage_options={"key": "testing", "secret": FAKE_SECRET}), mode="w"
    )
    assert "opening store" in caplog.text
    assert FAKE_SECRET not in caplog.text


def test_wrong_credentials_fail_loudly(s3_endpoint: str) -> None:
    """A missing bucket is an error on open for reading, not an empty store."""
    import zarr

    _s3fs_clear()
    with pytest.raises(FileNotFoundError):
        zarr.open_group(storage.open_store(f"s3://no-such-bucket-{os.getpid()}/c.zarr"), mode="r")


def test_input_errors_name_the_url_and_the_variables() -> None:
    secret_url = "https://data.example/scenes.parquet?sv=2024&sig=very-secret-sig"
    missing = str(storage.input_error(secret_url, "scenes table", FileNotFoundError("x"),
                                      "ssl4eo search"))
    assert "does not exist" in missing and "ssl4eo search" in missing
    assert "very-secret-sig" not in missing and "data.example/scenes.parquet" in missing
    refused = str(storage.input_error("s3://bkt/t/scenes.parquet", "scenes table",
                                      PermissionError("Access Denied")))
    assert "s3://bkt/t/scenes.parquet" in refused
    assert "AWS_ACCESS_KEY_ID" in refused and "AWS_SECRET_ACCESS_KEY" in refused
    az = str(storage.input_error("az://cont/scenes.parquet", "scenes table",
                                 RuntimeError("Server failed to authenticate the request (403)")))
    assert "AZURE_STORAGE_ACCOUNT_NAME" in az
    local = str(storage.input_error("/nope/scenes.parquet", "scenes table", FileNotFoundError()))
    assert "does not exist" in local and "AWS" not in local
