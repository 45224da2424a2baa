"""``ssl4eo export v1.1``: the store in SSL4EO-S12 v1.1's layout, read the way v1.1's code
reads it (``xr.open_zarr(path)`` under zarr 2.18, the version v1.1 requires) and compared,
value for value, with the store."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import export, layout, store
from pipeline.errors import UserError

#: What SSL4EO-S12 v1.1 requires (zarr==2.18.0) and the xarray of its release (2025-03);
#: today's xarray no longer opens zarr 2 stores, and numcodecs 0.16 no longer loads zarr 2.18.
ZARR2_REQUIREMENTS = ["zarr==2.18.0", "numcodecs<0.16", "xarray==2025.1.2"]



@pytest.fixture(scope="module")
def exported(clean_store, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("v11")
    # 3 samples per file so that the test store spans several files (v1.1: 64)
    return out, export.export_v11(str(clean_store), str(out), split="val", progress=False,
                                  samples_per_file=3)


def _open_zip(path: Path) -> xr.Dataset:
    return xr.open_zarr(zarr.storage.ZipStore(path, mode="r"))


def test_layout_names_and_splits(exported, clean_store):
    out, manifest = exported
    status = store.read_status(clean_store)
    n_complete = int((status == layout.STATUS_CODES["complete"]).sum())
    assert manifest["samples"] == n_complete and n_complete > 3
    names = [f["name"] for f in manifest["files"]]
    assert names[0] == "ssl4eos12_val_seasonal_data_000001.zarr.zip"
    assert len(names) == -(-n_complete // 3)
    assert sorted(manifest["modalities"]) == sorted(store.open_root(clean_store).group_keys())
    for m in manifest["modalities"]:
        assert sorted(p.name for p in (out / "val" / m).iterdir()) == names
    assert (out / "splits" / "ssl4eos12_val.txt").read_text().split() == names
    assert json.loads((out / export.MANIFEST).read_text())["files"] == manifest["files"]


def test_file_is_zarr_v2_zip_with_v11_variables_and_dtypes(exported):
    out, manifest = exported
    path = out / "val" / "S2L2A" / manifest["files"][0]["name"]
    with zipfile.ZipFile(path) as zf:
        keys = zf.namelist()
        assert len(keys) == len(set(keys)), "one zip entry per key"
        assert {".zgroup", ".zmetadata", "bands/.zarray"} <= set(keys)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        zarray = json.loads(zf.read("bands/.zarray"))
    assert zarray["zarr_format"] == 2 and zarray["dtype"] == "<i2"
    assert zarray["chunks"] == [1, 1, 12, 264, 264]  # each timestamp its own chunk
    ds = _open_zip(path)
    assert dict(ds.sizes) == {"sample": 3, "time": 4, "band": 12, "y": 264, "x": 264}
    assert set(ds.data_vars) == set(export.V11_VARIABLES)
    assert ds["bands"].dtype == np.int16 and ds["cloud_mask"].dtype == np.uint8
    assert ds["crs"].dtype == np.int64 and ds["center_lat"].dtype == np.float64
    assert ds["time_"].dtype == "datetime64[ns]" and ds["x_"].dtype == np.float64
    assert ds["sample"].dtype == "<U7" and list(ds["band"].values) == list(layout.BANDS["S2L2A"])
    assert ds["sample_id"].values[0, 2] == f"{ds['sample'].values[0]}_2"
    s1 = _open_zip(out / "val" / "S1RTC" / manifest["files"][0]["name"])
    assert s1["bands"].dtype == np.float16 and "cloud_mask" not in s1
    assert list(s1["band"].values) == ["vv", "vh"]


def test_values_equal_the_store(exported, clean_store):
    out, manifest = exported
    for m in manifest["modalities"]:
        src = xr.open_zarr(clean_store, group=m)
        for f in manifest["files"]:
            ds = _open_zip(out / "val" / m / f["name"])
            part = src.sel(sample=f["samples"])
            assert list(ds["sample"].values) == f["samples"]
            want = part["bands"].values
            if m.startswith("S1"):
                np.testing.assert_array_equal(ds["bands"].values, want.astype(np.float16))
            else:
                np.testing.assert_array_equal(ds["bands"].values.astype(np.int32),
                                              want.astype(np.int32))
                np.testing.assert_array_equal(ds["cloud_mask"].values, part["cloud_mask"].values)
            for var in ("center_lat", "center_lon", "x_", "y_", "time_", "crs"):
                np.testing.assert_array_equal(ds[var].values, part[var].values, err_msg=var)
            np.testing.assert_array_equal(ds["file_id"].values, part["file_id"].values)


def test_v1_store_exports_in_the_v11_convention(v1_store, exported, tmp_path):
    out, manifest = exported
    res = export.export_v11(str(v1_store), str(tmp_path), split="val", progress=False,
                            samples_per_file=3, modalities=["S2L2A"])
    assert res["store_s2_offset"] == 0 and res["files"] == manifest["files"]
    for f in manifest["files"]:
        a = _open_zip(tmp_path / "val" / "S2L2A" / f["name"])["bands"].values
        b = _open_zip(out / "val" / "S2L2A" / f["name"])["bands"].values
        np.testing.assert_array_equal(a, b)


def test_to_v11_bands_offsets_valid_pixels_and_clips():
    dn = np.array([0, 1, 500, 32000, 40000], np.uint16)
    np.testing.assert_array_equal(export.to_v11_bands(dn, "S2L2A", 0),
                                  [0, 1001, 1500, 32767, 32767])
    np.testing.assert_array_equal(export.to_v11_bands(dn, "S2L2A", 1000),
                                  [0, 1, 500, 32000, 32767])
    db = np.array([-12.5, np.nan], np.float32)
    out = export.to_v11_bands(db, "S1RTC", 1000)
    assert out.dtype == np.float16 and out[0] == np.float16(-12.5) and np.isnan(out[1])


def test_rerun_keeps_files_and_another_export_is_refused(exported, clean_store, v1_store):
    out, manifest = exported
    again = export.export_v11(str(clean_store), str(out), split="val", progress=False,
                              samples_per_file=3)
    assert again["files_written"] == 0 and again["files_kept"] > 0
    with pytest.raises(UserError, match="--overwrite"):
        export.export_v11(str(v1_store), str(out), split="val", progress=False,
                          samples_per_file=3)


def test_cli_export(clean_store, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["export", "v1.1", "--store", str(clean_store), "--out", str(tmp_path),
                 "--modalities", "S1RTC", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["modalities"] == ["S1RTC"] and len(result["files"]) == 1  # <= 64 samples
    assert (tmp_path / "train" / "S1RTC" / "ssl4eos12_train_seasonal_data_000001.zarr.zip").is_file()
    assert main(["export", "v1.1", "--store", str(tmp_path / "nope.zarr"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "build it with `ssl4eo build`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def zarr2_python(tmp_path_factory) -> str:
    """A Python with zarr 2.18, which SSL4EO-S12 v1.1 requires (``zarr==2.18.0``; zarr 3
    "might lead to errors"), installed from the package index into its own venv."""
    venv = tmp_path_factory.mktemp("zarr2") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    proc = subprocess.run([py, "-m", "pip", "install", "--quiet", *ZARR2_REQUIREMENTS],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"installing {ZARR2_REQUIREMENTS} failed:\n{proc.stderr[-2000:]}"
    return py


READ_AS_V11 = r"""
import json, sys
import numpy as np, xarray as xr, zarr
assert zarr.__version__ == "2.18.0", zarr.__version__
out = {}
for path in sys.argv[1:]:
    ds = xr.open_zarr(path)          # exactly as SSL4EO-S12 v1.1's README and loader do
    bands = ds.bands.values
    out[path] = {"sizes": dict(ds.sizes), "dtype": str(bands.dtype),
                 "sum": float(np.nansum(bands.astype("float64"))),
                 "sample": [str(s) for s in ds["sample"].values],
                 "sample_id": [str(s) for s in ds["sample_id"].values[:, 0]],
                 "time_": [str(t) for t in ds["time_"].values[:, 0]],
                 "crs": [int(c) for c in ds["crs"].values]}
print(json.dumps(out))
"""


def test_zarr2_reads_the_export_as_v11_code_does(zarr2_python, exported, clean_store):
    out, manifest = exported
    paths = [str(out / "val" / m / manifest["files"][0]["name"]) for m in manifest["modalities"]]
    proc = subprocess.run([zarr2_python, "-c", READ_AS_V11, *paths], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    samples = manifest["files"][0]["samples"]
    for m, path in zip(manifest["modalities"], paths):
        got = seen[path]
        part = xr.open_zarr(clean_store, group=m).sel(sample=samples)
        assert got["sample"] == samples and got["sample_id"] == [f"{s}_0" for s in samples]
        assert got["dtype"] == export.V11_BANDS_DTYPE[m]
        want = export.to_v11_bands(part["bands"].values, m, 1000).astype("float64")
        assert got["sum"] == pytest.approx(float(np.nansum(want)), rel=1e-9)
        assert got["crs"] == [int(c) for c in part["crs"].values]
        assert got["time_"] == [str(t) for t in part["time_"].values[:, 0]]
