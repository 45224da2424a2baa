"""Patch-level cloud choice and the quality table, on the embedded catalog (whose synthetic
clouds show in SCL)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from pipeline import layout, store
from pipeline.runner import BuildOptions, run_build
from pipeline.search import read_scenes

SSL4EO = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def scene_rule_store(demo_tables, tmp_path_factory) -> Path:
    """The same tables built with the scene-level rule alone (the patch rule switched off)."""
    path = tmp_path_factory.mktemp("scene-rule") / "cube.zarr"
    run_build(demo_tables["locations"], demo_tables["scenes"], path,
              options=BuildOptions(provider="local", shard_samples=2, max_patch_cloud=1.0,
                                   min_valid=0.0),
              client_options={"workers": 2, "threads": 1}, progress=False)
    return path


def test_search_keeps_ranked_candidates(demo_tables):
    df = read_scenes(demo_tables["scenes"])
    s2 = df[(df["modality"] == "S2L2A") & (df["status"] == "ok")]
    assert (s2["candidates"] != "").any()
    for r in s2[s2["candidates"] != ""].itertuples():
        others = json.loads(r.candidates)
        assert 1 <= len(others) <= 2  # demo config: candidates 3 = the choice + 2
        assert r.item_id not in {o["id"] for o in others}
        clouds = np.float32([r.cloud_cover] + [o["properties"]["eo:cloud_cover"]
                                              for o in others])  # the table's float32
        assert list(clouds) == sorted(clouds)  # least_cloudy: the rule's order
        assert all(o["properties"]["eo:cloud_cover"] < 20 for o in others)  # the first filter
    s1 = df[df["modality"] == "S1RTC"]
    assert (s1["candidates"] == "").all()


def test_patch_rule_lowers_patch_cloud(clean_store, scene_rule_store):
    patch = store.quality_table(clean_store).set_index(["sample", "season", "modality"])
    scene = store.quality_table(scene_rule_store).set_index(["sample", "season", "modality"])
    key = [k for k in patch.index if k[2] == "S2L2A"]
    p, s = patch.loc[key], scene.loc[key]
    bad_p = p["patch_cloud_fraction"] + 1 - p["valid_fraction"]
    bad_s = s["patch_cloud_fraction"] + 1 - s["valid_fraction"]
    # never worse, better on the whole, and the scene rule's store never looked further
    assert (bad_p <= bad_s + 1e-6).all()
    assert p["patch_cloud_fraction"].mean() < s["patch_cloud_fraction"].mean()
    assert (s["candidate_rank"] == 0).all() and (s["candidates_tried"] == 1).all()
    switched = p["candidate_rank"] > 0
    assert switched.any()
    assert (p.loc[switched, "file_id"] != s.loc[switched, "file_id"]).all()
    # a first candidate within the thresholds is kept without judging another (no extra read)
    clear = (s["patch_cloud_fraction"] <= 0.05) & (s["valid_fraction"] >= 0.95)
    assert clear.any() and (p.loc[clear, "candidates_tried"] == 1).all()
    # the recorded fraction is the stored cloud mask's
    ds = xr.open_zarr(clean_store, group="S2L2A")
    ids = list(ds["sample"].values)
    for (sample, season, _), row in p.head(12).iterrows():
        cm = ds["cloud_mask"].values[ids.index(sample), season]
        assert row["patch_cloud_fraction"] == pytest.approx((cm == 1).mean(), abs=1e-6)


def test_quality_table_columns_and_stats_cli(clean_store, tmp_path):
    q = store.quality_table(clean_store)
    assert {"sample", "season", "modality", "file_id", "cloud_cover", "candidates_tried",
            "candidate_rank", "patch_cloud_fraction", "valid_fraction", "zero_bands",
            "dn_offset", "offset_rule"} <= set(q.columns)
    s2 = q[q["modality"] == "S2L2A"]
    assert set(s2["offset_rule"]) == {"s2:processing_baseline"}
    assert set(s2["dn_offset"]) <= {0, layout.S2_BASELINE_OFFSET}
    assert (q["zero_bands"] == 0).all()
    csv = tmp_path / "quality.csv"
    out = subprocess.run([*SSL4EO, "stats", "--store", str(clean_store), "--quality", str(csv)],
                         capture_output=True, text=True, check=True).stdout
    assert "S2L2A quality" in out and "patch cloud fraction: mean" in out
    assert "offset rules: s2:processing_baseline" in out
    back = pd.read_csv(csv, dtype={"sample": str})
    assert len(back) == len(q) and list(back["file_id"]) == list(q["file_id"])
    js = json.loads(subprocess.run([*SSL4EO, "stats", "--store", str(clean_store), "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert js["quality"]["S2L2A"]["seasons"] == len(s2)
    assert js["quality"]["S2L2A"]["runner_up_taken"] == int((s2["candidate_rank"] > 0).sum())


def test_zero_bands_counts_empty_bands():
    from pipeline.runner import _place

    a = store.empty_shard("S2L2A", ["0000000"])
    bands = np.ones((1, 12, 264, 264), np.uint16)
    bands[0, 3] = 0
    ds = xr.Dataset(
        {"bands": (("time", "band", "y", "x"), bands),
         "valid_fraction": (("time",), np.array([0.5], np.float32)),
         "cloud_mask": (("time", "y", "x"), np.zeros((1, 264, 264), np.uint8))},
        coords={"time": [np.datetime64("2022-01-01", "ns")], "season": ("time", [1]),
                "file_id": ("time", ["x"]), "cloud_cover": ("time", [1.0])})
    assert _place(a, 0, ds, "S2L2A") == 1
    assert a["zero_bands"][0, 1] == 1 and a["zero_bands"][0, 0] == 0
