"""Bad input, one table, each case through the command line (``pipeline.cli.main``).

Every case ends either in exit status 2 with ``ssl4eo: error: ...`` on stderr naming the input
and what was wrong (never a traceback), or in a recorded skip: the run succeeds and the output
says what was skipped and why (a failed sample with its reason, a missing season with NaT / ""
/ nodata, a missing scenes-table row with its reason), never fill passed off as data.

The API-level tests of the same rules live next to their stages (test_config, test_sampling,
test_search, test_cube, test_build); this table checks what a user of ``ssl4eo`` sees.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
from test_reliability import _samples, fresh_root_logging, subset_locations  # noqa: F401

from pipeline import layout
from pipeline.cli import main

GROUPS = ("S2L2A", "S1RTC")
BUILD_FLAGS = ["--provider", "local", "--shard-samples", "2", "--workers", "1", "--threads", "1",
               "--no-progress"]


@dataclass
class Case:
    """CLI runs: every step but the last must succeed; the last gives ``rc``."""

    steps: list[list[str]]
    rc: int = 2
    message: str | None = None  # regex that stderr must match (rc 2)
    names: str | None = None  # the input the message must name
    check: Callable[[str], None] | None = None  # inspects the outputs (recorded skips)
    notes: dict = field(default_factory=dict)


class Ctx:
    def __init__(self, request: pytest.FixtureRequest, tmp: Path) -> None:
        self.request, self.tmp = request, tmp

    def fixture(self, name: str):  # noqa: ANN201 - only the cases that need a catalog start one
        return self.request.getfixturevalue(name)

    def write(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def scenes(self, samples: list[str], edit: Callable | None = None) -> Path:
        """The demo scenes table reduced to ``samples``; ``edit(df)`` may change it."""
        table = pq.read_table(self.fixture("demo_tables")["scenes"])
        df = table.to_pandas()
        df = df[df["sample"].astype(str).isin(samples)].reset_index(drop=True)
        if edit is not None:
            edit(df)
        out = self.tmp / "scenes.parquet"
        copy = pa.Table.from_pandas(df, schema=table.schema, preserve_index=False)
        pq.write_table(copy.replace_schema_metadata(table.schema.metadata), out)
        return out

    def locations(self, samples: list[str]) -> Path:
        return subset_locations(self.fixture("demo_tables")["locations"], samples,
                                self.tmp / "locations.parquet")


CASES: dict[str, Callable[[Ctx], Case]] = {}


def case(name: str):  # noqa: ANN201
    def register(fn: Callable[[Ctx], Case]) -> Callable[[Ctx], Case]:
        CASES[name] = fn
        return fn
    return register


def _out(ctx: Ctx) -> str:
    return str(ctx.tmp / "out.parquet")


# --------------------------------------------------------------------------------- config
@case("malformed-yaml")
def _(ctx: Ctx) -> Case:
    p = ctx.write("bad.yaml", "sampling: {num_locations: 10\nseasons: [\n")
    return Case([["sample", "--config", str(p), "--out", _out(ctx)]],
                message="is not valid YAML", names=str(p))


@case("yaml-not-a-mapping")
def _(ctx: Ctx) -> Case:
    p = ctx.write("list.yaml", "- sampling\n- seasons\n")
    return Case([["sample", "--config", str(p), "--out", _out(ctx)]],
                message="must hold a mapping of sections, got list", names=str(p))


@case("missing-config-file")
def _(ctx: Ctx) -> Case:
    p = ctx.tmp / "nope.yaml"
    return Case([["sample", "--config", str(p), "--out", _out(ctx)]],
                message="cannot read config file", names=str(p))


@case("unknown-preset")
def _(ctx: Ctx) -> Case:
    return Case([["sample", "--preset", "ssl4eo", "--out", _out(ctx)]],
                message=r"unknown preset 'ssl4eo'.*calendar, demo, ssl4eo-s12")


@case("unknown-section")
def _(ctx: Ctx) -> Case:
    p = ctx.write("c.yaml", "sampeling: {num_locations: 3}\n")
    return Case([["sample", "--config", str(p), "--out", _out(ctx)]],
                message=r"unknown section\(s\) \['sampeling'\]", names=str(p))


@case("unknown-key")
def _(ctx: Ctx) -> Case:
    p = ctx.write("c.yaml", "sampling: {sigma: 5}\n")
    return Case([["sample", "--config", str(p), "--out", _out(ctx)]],
                message=r"sampling\.sigma: Extra inputs are not permitted", names=str(p))


@case("unknown-build-key")
def _(ctx: Ctx) -> Case:
    t = ctx.fixture("demo_tables")
    p = ctx.write("c.yaml", "preset: demo\nbuild: {shard_size: 3}\n")
    return Case([["build", "--config", str(p), "--locations", str(t["locations"]), "--scenes",
                  str(t["scenes"]), "--store", str(ctx.tmp / "cube.zarr"), *BUILD_FLAGS]],
                message=r"unknown key\(s\) \['shard_size'\] in the config's build section")


@case("reversed-dates")
def _(ctx: Ctx) -> Case:
    p = ctx.write("c.yaml", "seasons:\n  reference_dates: [2021-09-22, 2021-06-21, 2021-03-20,"
                  " 2020-12-21]\n")
    return Case([["sample", "--config", str(p), "--out", _out(ctx)]],
                message="strictly increasing", names=str(p))


@case("cloud-cover-out-of-range")
def _(ctx: Ctx) -> Case:
    return Case([["search", "--preset", "demo", "--max-cloud", "150", "--stac-url",
                  "http://127.0.0.1:9", "--locations", str(ctx.tmp / "l.parquet"), "--out",
                  _out(ctx)]],
                message=r"seasons.max_cloud_cover: .*=150(\.0)? is out of range.*\(0, 100\]")


@case("unknown-signer")
def _(ctx: Ctx) -> Case:
    t = ctx.fixture("demo_tables")
    return Case([["build", "--locations", str(t["locations"]), "--scenes", str(t["scenes"]),
                  "--store", str(ctx.tmp / "cube.zarr"), "--signer", "nopkg.auth:sign",
                  *BUILD_FLAGS]],
                message=r"signer 'nopkg.auth:sign': cannot import module 'nopkg.auth'",
                names="nopkg.auth:sign",
                check=lambda out: _assert_absent(ctx.tmp / "cube.zarr"))


# ------------------------------------------------------------------------- points / AOI
@case("aoi-without-area")
def _(ctx: Ctx) -> Case:
    p = ctx.write("aoi.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Point", "coordinates": [10, 50]}}]}))
    return Case([["sample", "--preset", "demo", "--aoi", str(p), "--out", _out(ctx)]],
                message="holds no polygon with area", names=str(p))


@case("aoi-unreadable")
def _(ctx: Ctx) -> Case:
    p = ctx.write("aoi.geojson", "{not json")
    return Case([["sample", "--preset", "demo", "--aoi", str(p), "--out", _out(ctx)]],
                message="cannot read AOI file", names=str(p))


@case("aoi-outside-lon-lat")
def _(ctx: Ctx) -> Case:
    """An AOI in projected metres (a bbox copied from a UTM map), no CRS: not lon/lat."""
    ring = [[500000, 5700000], [510000, 5700000], [510000, 5710000], [500000, 5710000],
            [500000, 5700000]]
    p = ctx.write("aoi.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    return Case([["sample", "--preset", "demo", "--aoi", str(p), "--out", _out(ctx), "-n",
                  "3", "--no-progress"]], message="lon/lat|longitude|latitude", names=str(p))


@case("points-outside-lon-lat")
def _(ctx: Ctx) -> Case:
    p = ctx.write("pts.csv", "lon,lat\n10.0,50.0\n10.0,95.0\n")
    return Case([["sample", "--preset", "demo", "--points", str(p), "--out", _out(ctx)]],
                message=r"1 of 2 points are not valid lon/lat")


@case("points-without-lon-lat-columns")
def _(ctx: Ctx) -> Case:
    p = ctx.write("pts.csv", "a,b\n1,2\n")
    return Case([["sample", "--preset", "demo", "--points", str(p), "--out", _out(ctx)]],
                message=r"needs lon and lat columns", names=str(p))


# --------------------------------------------------------------------------------- stores
@case("store-does-not-exist")
def _(ctx: Ctx) -> Case:
    p = ctx.tmp / "none.zarr"
    return Case([["stats", "--store", str(p)]], message="does not exist", names=str(p))


def _old_store(ctx: Ctx, samples: list[str]) -> Path:
    """A store template whose root says it was written by schema version 0."""
    from pipeline import store

    path = ctx.tmp / "old.zarr"
    store.create_store(path, samples, GROUPS, provenance={}, shard_samples=2)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][layout.ATTR_SCHEMA] = "0"
    (path / "zarr.json").write_text(json.dumps(meta))
    return path


@case("store-of-another-version-stats")
def _(ctx: Ctx) -> Case:
    p = _old_store(ctx, ["0000000"])
    return Case([["stats", "--store", str(p)]],
                message=r"has schema version '0', this package writes '1'.*new --store",
                names=str(p))


@case("store-of-another-version-build")
def _(ctx: Ctx) -> Case:
    t = ctx.fixture("demo_tables")
    p = _old_store(ctx, _samples(t))
    before = sorted(f.relative_to(p) for f in p.rglob("*"))

    def untouched(out: str) -> None:
        assert sorted(f.relative_to(p) for f in p.rglob("*")) == before

    return Case([["build", "--locations", str(t["locations"]), "--scenes", str(t["scenes"]),
                  "--store", str(p), *BUILD_FLAGS]],
                message=r"has schema version '0'", names=str(p), check=untouched)


# ------------------------------------------------------------------- scenes (recorded skips)
def _first_with(ctx: Ctx, modality: str, skip: int = 0) -> tuple[str, dict, int]:
    """(sample, item, season) of the first chosen ``modality`` scene from sample ``skip`` on."""
    df = pq.read_table(ctx.fixture("demo_tables")["scenes"]).to_pandas()
    order = _samples(ctx.fixture("demo_tables"))
    ok = df[(df["status"] == "ok") & (df["modality"] == modality)]
    ok = ok[ok["sample"].astype(str).isin(order[skip:])]
    r = ok.iloc[0]
    return str(r["sample"]), json.loads(r["item_json"]), int(r["season"])


def _store_sample(store: Path, sample: str) -> dict:
    root = xr.open_zarr(store, consolidated=False)
    i = list(root["sample"].values).index(sample)
    out = {"status": int(root["status"].values[i]), "failure": str(root["failure"].values[i])}
    for g in GROUPS:
        ds = xr.open_zarr(store, group=g, consolidated=False)
        out[g] = {k: ds[k].values[i] for k in ("bands", "file_id", "time_")}
    return out


def _assert_absent(path: Path) -> None:
    assert not path.exists(), f"{path} was written"


@case("scene-missing-an-asset")
def _(ctx: Ctx) -> Case:
    sample, item, _ = _first_with(ctx, "S2L2A")

    def drop_b8a(df) -> None:  # noqa: ANN001
        i = df.index[df["item_id"] == item["id"]][0]
        it = json.loads(df.at[i, "item_json"])
        del it["assets"]["B8A"]
        df.at[i, "item_json"] = json.dumps(it)

    scenes = ctx.scenes([sample], drop_b8a)
    store = ctx.tmp / "cube.zarr"

    def recorded(out: str) -> None:
        s = _store_sample(store, sample)
        assert s["status"] == layout.STATUS_CODES["failed"]
        assert re.search(rf"scene '{item['id']}' has no asset\(s\) \['B8A'\]", s["failure"])
        assert f"failed {sample}" in out and "B8A" in out
        for g in GROUPS:  # nothing of the failed sample is stored as data
            assert (s[g]["file_id"] == "").all() and np.isnat(s[g]["time_"]).all()

    return Case([["build", "--locations", str(ctx.locations([sample])), "--scenes",
                  str(scenes), "--store", str(store), *BUILD_FLAGS]], rc=0, check=recorded)


@case("metadata-disagrees-with-file")
def _(ctx: Ctx) -> Case:
    """A scene whose metadata says it covers the patch but whose files are another tile's,
    elsewhere on Earth: the season is stored as missing, never as misplaced pixels."""
    import shapely

    sample, item, season = _first_with(ctx, "S2L2A")
    df = pq.read_table(ctx.fixture("demo_tables")["scenes"]).to_pandas()
    donors = [json.loads(j) for j in df.loc[(df["status"] == "ok")
                                            & (df["modality"] == "S2L2A"), "item_json"]]
    here = shapely.geometry.shape(item["geometry"])
    donor = next(d for d in donors
                 if not shapely.geometry.shape(d["geometry"]).buffer(1.0).intersects(here))

    def swap_files(df) -> None:  # noqa: ANN001
        i = df.index[df["item_id"] == item["id"]][0]
        it = json.loads(df.at[i, "item_json"])
        for k, a in it["assets"].items():
            a["href"] = donor["assets"][k]["href"]
        df.at[i, "item_json"] = json.dumps(it)

    scenes = ctx.scenes([sample], swap_files)
    store = ctx.tmp / "cube.zarr"

    def skipped(out: str) -> None:
        s = _store_sample(store, sample)
        assert s["status"] == layout.STATUS_CODES["complete"], s["failure"]
        s2 = s["S2L2A"]
        assert s2["file_id"][season] == "" and np.isnat(s2["time_"][season])
        assert (s2["bands"][season] == layout.S2_NODATA).all()
        others = [k for k in range(layout.NUM_SEASONS) if k != season and s2["file_id"][k]]
        assert others and all((s2["bands"][k] != layout.S2_NODATA).any() for k in others)

    return Case([["build", "--locations", str(ctx.locations([sample])), "--scenes",
                  str(scenes), "--store", str(store), *BUILD_FLAGS]], rc=0, check=skipped)


@case("empty-search-results")
def _(ctx: Ctx) -> Case:
    """Locations where the catalog has nothing (mid-Pacific): every row missing with its
    reason; the build stores nodata and NaT, never fill as data."""
    api = ctx.fixture("stac_api")
    pts = ctx.write("pts.csv", "lon,lat\n-140.0,10.0\n-141.0,11.0\n")
    locs, scenes, store = ctx.tmp / "l.parquet", ctx.tmp / "s.parquet", ctx.tmp / "cube.zarr"

    def recorded(out: str) -> None:
        df = pq.read_table(scenes).to_pandas()
        assert len(df) == 2 * 4 * 2 and (df["status"] == "missing").all()
        assert df["reason"].str.fullmatch(
            r"no scene (with eo:cloud_cover < 20 )?in the window intersects the patch").all()
        assert (df["item_json"] == "").all()
        root = xr.open_zarr(store, consolidated=False)
        assert (root["status"].values == layout.STATUS_CODES["complete"]).all()
        for g in GROUPS:
            ds = xr.open_zarr(store, group=g, consolidated=False)
            assert (ds["file_id"].values == "").all() and np.isnat(ds["time_"].values).all()
            b = ds["bands"].values
            assert (np.isnan(b) if g == "S1RTC" else b == layout.S2_NODATA).all()
        assert out.count("0 scenes, 8 seasons without a scene") == 2  # 2 samples x 4, x 2

    return Case([
        ["sample", "--preset", "demo", "--points", str(pts), "--out", str(locs)],
        ["search", "--preset", "demo", "--stac-url", api.stac_url, "--locations", str(locs),
         "--out", str(scenes), "--no-progress"],
        ["build", "--locations", str(locs), "--scenes", str(scenes), "--store", str(store),
         *BUILD_FLAGS],
    ], rc=0, check=recorded)


@case("all-cloud-windows")
def _(ctx: Ctx) -> Case:
    """A cloud limit no scene meets: every S2 row missing with a reason; the build stores S2
    nodata / NaT / "" and still the S1 scenes."""
    t = ctx.fixture("demo_tables")
    api = ctx.fixture("stac_api")
    df = pq.read_table(t["scenes"]).to_pandas()
    # samples whose S2 scenes all have some cloud (none at 0 %), so a 0.001 % limit drops all
    s2 = df[(df["modality"] == "S2L2A") & (df["status"] == "ok")]
    cloudy = [s for s in _samples(t) if s in set(s2["sample"].astype(str))
              and (s2.loc[s2["sample"].astype(str) == s, "cloud_cover"] > 0.001).all()]
    assert cloudy, "the test catalog has no location whose scenes are all cloudy"
    locs = ctx.locations(cloudy[:2])
    scenes, store = ctx.tmp / "s.parquet", ctx.tmp / "cube.zarr"

    def recorded(out: str) -> None:
        got = pq.read_table(scenes).to_pandas()
        g2 = got[got["modality"] == "S2L2A"]
        assert (g2["status"] == "missing").all() and (g2["reason"].str.len() > 0).all()
        assert (got.loc[got["modality"] == "S1RTC", "status"] == "ok").any()
        ds = xr.open_zarr(store, group="S2L2A", consolidated=False)
        assert (ds["file_id"].values == "").all() and np.isnat(ds["time_"].values).all()
        assert (ds["bands"].values == layout.S2_NODATA).all()
        assert (ds["cloud_mask"].values == 255).all()
        s1 = xr.open_zarr(store, group="S1RTC", consolidated=False)
        assert (s1["file_id"].values != "").any()
        assert np.isfinite(s1["bands"].values[s1["file_id"].values != ""]).any()

    return Case([
        ["search", "--preset", "demo", "--stac-url", api.stac_url, "--locations", str(locs),
         "--out", str(scenes), "--max-cloud", "0.001", "--no-progress"],
        ["build", "--locations", str(locs), "--scenes", str(scenes), "--store", str(store),
         *BUILD_FLAGS],
    ], rc=0, check=recorded)


# ---------------------------------------------------------------------------------- the test
pytestmark = pytest.mark.usefixtures("fresh_root_logging")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                   capsys: pytest.CaptureFixture) -> None:
    c = CASES[name](Ctx(request, tmp_path))
    for argv in c.steps[:-1]:
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, (argv, err)
    rc = main(c.steps[-1])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert rc == c.rc, (rc, out, err)
    if c.rc == 2:
        assert err.startswith("ssl4eo: error: "), err
        assert re.search(c.message, err), (c.message, err)
        if c.names:
            assert c.names in err, (c.names, err)
    if c.check is not None:
        c.check(out)
