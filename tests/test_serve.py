"""The served embedded catalog: pystac-client searches and windowed COG reads over HTTP Range.

Expected answers are computed from the catalog's item files, so the tests hold for whatever
the catalog builder writes.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import mapping, shape

pystac_client = pytest.importorskip("pystac_client")
rasterio = pytest.importorskip("rasterio")


def _items(catalog: Path, collection: str | None = None) -> list[dict]:
    pattern = f"{collection}/*.json" if collection else "*/*.json"
    return [json.loads(p.read_text()) for p in sorted((catalog / "items").glob(pattern))]


def _dt(item: dict) -> datetime:
    return datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00"))


def _s2(catalog: Path) -> list[dict]:
    items = _items(catalog, "sentinel-2-l2a")
    if len(items) < 4:
        pytest.skip("the test catalog has fewer than 4 sentinel-2-l2a items")
    return items


@pytest.fixture(scope="module")
def client(stac_api):
    return pystac_client.Client.open(stac_api.stac_url)


def test_landing_page_and_collections(client, stac_api, demo_catalog):
    conforms = client.get_conforms_to()
    assert any("item-search" in c for c in conforms)
    assert any("filter" in c for c in conforms)
    want = {p.stem for p in (demo_catalog / "collections").glob("*.json")}
    assert {c.id for c in client.get_collections()} == want
    assert sum(stac_api.counts.values()) == len(_items(demo_catalog))


def test_asset_hrefs_point_at_the_asset_server(client, stac_api):
    item = next(client.search(collections=["sentinel-2-l2a"], max_items=1).items())
    for asset in item.assets.values():
        if asset.href.endswith(".tif"):
            assert asset.href.startswith(stac_api.asset_url + "/assets/sentinel-2-l2a/")


def test_intersects(client, demo_catalog):
    items = _s2(demo_catalog)
    target = items[0]
    point = shape(target["geometry"]).representative_point()
    expected = {i["id"] for i in items if shape(i["geometry"]).intersects(point)}
    found = {
        i.id for i in client.search(
            collections=["sentinel-2-l2a"], intersects=mapping(point), limit=100
        ).items()
    }
    assert target["id"] in found
    assert found == expected
    # a point in the middle of the Pacific: nothing
    empty = client.search(
        collections=["sentinel-2-l2a"], intersects={"type": "Point", "coordinates": [-140.0, -40.0]}
    )
    assert list(empty.items()) == []


def test_datetime_range(client, demo_catalog):
    items = _s2(demo_catalog)
    times = sorted(_dt(i) for i in items)
    lo, hi = times[len(times) // 4], times[(3 * len(times)) // 4]
    expected = {i["id"] for i in items if lo <= _dt(i) <= hi}
    rng = f"{lo.isoformat().replace('+00:00', 'Z')}/{hi.isoformat().replace('+00:00', 'Z')}"
    found = {
        i.id for i in client.search(collections=["sentinel-2-l2a"], datetime=rng, limit=100).items()
    }
    assert found == expected and 0 < len(found) < len(items)


def test_cql2_json_cloud_cover_filter(client, demo_catalog):
    items = _s2(demo_catalog)
    ccs = sorted(i["properties"]["eo:cloud_cover"] for i in items)
    limit = ccs[len(ccs) // 2]
    expected = {i["id"] for i in items if i["properties"]["eo:cloud_cover"] < limit}
    search = client.search(
        collections=["sentinel-2-l2a"],
        filter={"op": "<", "args": [{"property": "eo:cloud_cover"}, limit]},
        filter_lang="cql2-json",
        limit=100,
    )
    got = list(search.items())
    assert {i.id for i in got} == expected and 0 < len(got) < len(items)
    assert all(i.properties["eo:cloud_cover"] < limit for i in got)


@pytest.mark.filterwarnings("ignore::pystac_client.warnings.DoesNotConformTo")
def test_sortby(client, demo_catalog):
    items = _s2(demo_catalog)
    got = list(client.search(
        collections=["sentinel-2-l2a"], sortby="-eo:cloud_cover", limit=100
    ).items())
    ccs = [i.properties["eo:cloud_cover"] for i in got]
    assert len(got) == len(items)
    assert ccs == sorted(ccs, reverse=True) and ccs[0] > ccs[-1]
    got = list(client.search(collections=["sentinel-2-l2a"], sortby="datetime", limit=100).items())
    times = [i.datetime for i in got]
    assert times == sorted(times)


def test_paging_past_one_page(client, demo_catalog):
    items = _items(demo_catalog)
    page = 3
    assert len(items) > 2 * page
    search = client.search(limit=page)
    pages = list(search.pages_as_dicts())
    assert len(pages) >= 3
    assert all(len(p["features"]) <= page for p in pages)
    assert any(link["rel"] == "next" for link in pages[0]["links"])
    assert not any(link["rel"] == "next" for link in pages[-1]["links"])
    ids = [f["id"] for p in pages for f in p["features"]]
    assert len(ids) == len(set(ids)) == len(items)


def _band_by_gsd(item: dict, gsd: int) -> str | None:
    """A reflectance band (B01..B12, B8A) of the item at ``gsd`` metres."""
    for key, a in sorted(item["assets"].items()):
        t = a.get("proj:transform")
        if (key.startswith("B") and a.get("href", "").endswith(".tif") and t
                and abs(t[0] - gsd) < 1e-6):
            return key
    return None


@pytest.mark.parametrize("gsd", [10, 20, 60])
def test_windowed_cog_read_uses_ranges(client, stac_api, demo_catalog, gsd):
    """A 64 x 64 window through /vsicurl/ fetches a small part of the file, at native res."""
    from rasterio.windows import Window

    def asset_size(it: dict, k: str) -> int:
        d = demo_catalog / "items" / "sentinel-2-l2a"
        return (d / it["assets"][k]["href"]).resolve().stat().st_size

    # the item whose band at this resolution is the largest file (a cloudy or half-empty scene
    # compresses to a few tiles, which GDAL's first request at open already covers)
    candidates = [(it, _band_by_gsd(it, gsd)) for it in _s2(demo_catalog)]
    candidates = [(it, k) for it, k in candidates if k is not None]
    if not candidates:
        pytest.skip(f"no {gsd} m band in the catalog")
    item, key = max(candidates, key=lambda c: asset_size(*c))
    served_item = next(client.search(ids=[item["id"]]).items())
    href = served_item.assets[key].href
    local = (demo_catalog / "items" / "sentinel-2-l2a" / f"{item['id']}.json").parent
    local = (local / item["assets"][key]["href"]).resolve()
    size = local.stat().st_size
    path = "/" + href.split("/", 3)[3]

    before = stac_api.asset_stats()["paths"].get(path, {"bytes": 0, "ranges": 0, "whole": 0})
    env = dict(
        GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif",
        GDAL_HTTP_MULTIRANGE="YES",
        VSI_CACHE="FALSE",
    )
    with rasterio.Env(**env), rasterio.open(f"/vsicurl/{href}?nocache={uuid.uuid4().hex}") as src:
        assert src.res == (float(gsd), float(gsd))
        assert list(src.transform)[:6] == item["assets"][key]["proj:transform"][:6]
        assert [src.height, src.width] == item["assets"][key]["proj:shape"]
        win = Window(src.width // 2, src.height // 2, min(64, src.width // 2),
                     min(64, src.height // 2))
        remote = src.read(1, window=win)
    after = stac_api.asset_stats()["paths"][path]
    with rasterio.open(local) as src:
        expect = src.read(1, window=win)
    np.testing.assert_array_equal(remote, expect)

    sent = after["bytes"] - before["bytes"]
    ranged = after["ranges"] - before["ranges"]
    assert ranged >= 1, "GDAL read through Range requests"
    assert after["whole"] == before["whole"], "no request fetched the whole file"
    # what a reader must fetch: the header and the tiles the window touches, nothing else
    # (the test catalog's images are small: a 20/60 m band may be one 512 x 512 tile)
    with rasterio.open(local) as src:
        bh, bw = src.block_shapes[0]
        rows = range(win.row_off // bh, (win.row_off + win.height - 1) // bh + 1)
        cols = range(win.col_off // bw, (win.col_off + win.width - 1) // bw + 1)
        needed = sum(src.block_size(1, r, c) for r in rows for c in cols)
        n_blocks = (-(-src.height // bh)) * (-(-src.width // bw))
    header = 64 * 1024  # GDAL's first read at open plus the tile index of a small COG
    assert 0 < sent <= needed + header, (sent, needed, size)
    if n_blocks >= 4:
        assert sent < size, f"read {sent} bytes of a {size}-byte file for a small window"
