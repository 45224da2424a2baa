"""The S2 offset convention is what the build was asked for, recorded as such, and read by
name by the loader and the training metadata (``--convention v1`` and ``v1.1`` end to end)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline import layout, store
from pipeline.errors import StoreError
from pipeline.runner import BuildOptions, run_build


def test_both_conventions_recorded_and_stored(v1_store, clean_store):
    a1, a11 = (dict(xr.open_zarr(p).attrs) for p in (v1_store, clean_store))
    assert layout.recorded_convention(a1) == ("v1", 0)
    assert layout.recorded_convention(a11) == ("v1.1", 1000)
    assert a1[layout.ATTR_CONVENTIONS]["s2_offset_convention"] == "v1"
    s1, s11 = (xr.open_zarr(p, group="S2L2A") for p in (v1_store, clean_store))
    assert "v1 convention" in s1["bands"].attrs["units"]
    np.testing.assert_array_equal(s1["file_id"].values, s11["file_id"].values)
    b1, b11 = s1["bands"].values.astype(np.int32), s11["bands"].values.astype(np.int32)
    valid = b11 > 0
    assert valid.any() and np.array_equal(b1 > 0, valid)
    # every valid pixel differs by the offset (none clipped in these scenes), nodata stays 0
    np.testing.assert_array_equal(b11[valid] - b1[valid], 1000)
    st1, st11 = (a[layout.ATTR_STATS]["S2L2A"] for a in (a1, a11))
    assert "v1 offset convention" in st1["units"]
    np.testing.assert_allclose(np.array(st11["mean"]) - np.array(st1["mean"]), 1000, atol=1e-6)
    np.testing.assert_allclose(st1["std"], st11["std"], rtol=1e-9)


def test_loader_and_training_read_the_recorded_convention(v1_store, clean_store):
    from pipeline.loader import ZarrPatchDataset, read_store_index
    from pipeline.train.engine import input_metadata

    assert read_store_index(v1_store, ("S2L2A",)).convention == "v1"
    assert read_store_index(v1_store, ("S2L2A",)).s2_offset == 0
    assert read_store_index(clean_store, ("S2L2A",)).s2_offset == 1000
    d1, d11 = (ZarrPatchDataset(p, "S2L2A", seasons=0) for p in (v1_store, clean_store))
    # normalised with each store's own statistics: the same network input either way
    x1, x11 = d1[0]["image"], d11[0]["image"]
    np.testing.assert_allclose(x1.numpy(), x11.numpy(), atol=1e-4)
    assert input_metadata(d1, ("S2L2A",))["s2_offset"] == 0
    assert input_metadata(d1, ("S2L2A",))["s2_convention"] == "v1"
    assert input_metadata(d11, ("S2L2A",))["s2_offset"] == 1000


def test_resume_with_another_convention_is_refused(v1_store, demo_tables):
    with pytest.raises(StoreError, match="v1 convention and this build asks for v1.1; resume "
                                         "with --convention v1"):
        run_build(demo_tables["locations"], demo_tables["scenes"], v1_store,
                  options=BuildOptions(provider="local", shard_samples=2),
                  client_options={"workers": 1, "threads": 1}, progress=False)
    assert store.read_status(v1_store).all()


# ------------------------------------------------------------------ self-describing groups
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_groups_describe_themselves(v1_store, clean_store):
    for path, conv, offset in ((clean_store, "v1.1", 1000), (v1_store, "v1", 0)):
        ds = xr.open_zarr(path, group="S2L2A")
        assert ds.attrs["s2_offset_convention"] == conv and ds.attrs["s2_offset"] == offset
        assert ds.attrs["description"].startswith("Sentinel-2 Level-2A")
        assert ds.attrs["units"] == ds["bands"].attrs["units"] == ds["band_mean"].attrs["units"]
        assert f"+ {offset} ({conv} convention)" in ds.attrs["units"]
        assert ds.attrs["bands"] == list(layout.BANDS["S2L2A"])
        assert ds.attrs["band_wavelength_nm"][layout.BANDS["S2L2A"].index("B04")] == 665
        # the statistics are variables on the band coordinate, equal to the root's record
        root_stats = dict(xr.open_zarr(path).attrs)[layout.ATTR_STATS]["S2L2A"]
        assert ds["band_mean"].dims == ("band",) and ds["band_std"].dims == ("band",)
        np.testing.assert_allclose(ds["band_mean"].values, root_stats["mean"])
        np.testing.assert_allclose(ds["band_std"].values, root_stats["std"])
        np.testing.assert_array_equal(ds["band_count"].values, root_stats["count"])
        assert float(ds["band_mean"].sel(band="B04")) > offset
        # CF-style attributes on every variable
        for name, var in ds.data_vars.items():
            assert var.attrs.get("long_name"), name
        assert ds["bands"].attrs["standard_name"] == "surface_bidirectional_reflectance"
        assert ds["center_lat"].attrs["units"] == "degrees_north"
        assert ds["x_"].attrs["standard_name"] == "projection_x_coordinate"
        # time_ still decodes to datetimes through its CF units
        assert np.issubdtype(ds["time_"].dtype, np.datetime64)
    s1 = xr.open_zarr(clean_store, group="S1RTC")
    assert s1.attrs["units"] == "dB" and s1["band_mean"].attrs["units"] == "dB"
    assert s1.attrs["polarisations"] == ["vv", "vh"]
    assert "standard_name" not in s1["bands"].attrs  # CF has none for backscatter in dB


def test_finalize_describes_a_store_written_before_groups_did(clean_store, tmp_path):
    """A store from before self-describing groups (no band_mean, no group attributes) gets
    them from the finalize that a resumed build runs; running it twice changes nothing."""
    import zarr

    path = _copy(clean_store, tmp_path / "old.zarr")
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    for m in root.attrs["ssl4eo:modalities"]:
        for name in ("band_mean", "band_std", "band_count"):
            del root[m][name]
        root[m].attrs.clear()
    zarr.consolidate_metadata(str(path), zarr_format=3)
    old = xr.open_zarr(path, group="S2L2A")
    assert "band_mean" not in old and "description" not in old.attrs
    first = store.finalize(path)
    again = store.finalize(path)
    assert first == again
    new, ref = (xr.open_zarr(p, group="S2L2A") for p in (path, clean_store))
    assert new.attrs == ref.attrs
    np.testing.assert_array_equal(new["band_mean"].values, ref["band_mean"].values)
    np.testing.assert_array_equal(new["bands"].values, ref["bands"].values)
