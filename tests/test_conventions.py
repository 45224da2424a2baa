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


@pytest.fixture(scope="module")
def v1_store(demo_tables, tmp_path_factory) -> Path:
    """The test tables built with ``--convention v1`` (clean_store is the default v1.1)."""
    path = tmp_path_factory.mktemp("v1") / "cube.zarr"
    run_build(demo_tables["locations"], demo_tables["scenes"], path,
              options=BuildOptions(provider="local", shard_samples=2, convention="v1"),
              client_options={"workers": 2, "threads": 1}, progress=False)
    return path


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
