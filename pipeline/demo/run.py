"""The demo driver behind ``ssl4eo demo`` (and ``make demo``).

The demo is a list of stages, :data:`STAGES`. Each stage is a function that takes the shared
:class:`DemoContext`, does its work (printing a few readable lines), and returns a dict of
figures; the driver times it and writes the figures into ``OUT/summary.json`` under the stage's
name right away, so a failed run still shows how far it got. To add a stage (sample, search,
build the store, pretrain, probe, ...), write ``def stage_x(ctx) -> dict`` and add
``("x", stage_x)`` to :data:`STAGES` in pipeline order. Stages pass things on through ``ctx``
(``ctx.served.stac_url``, files under ``ctx.out``, or ``ctx.state``); servers and other
resources register their clean-up with ``ctx.stack``, which is closed after the last stage or
on failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import CatalogError
from .cities import DEMO_CITIES, DEMO_YEAR

SUMMARY_FILE = "summary.json"
#: Written next to the catalog: what it was built with, to decide whether it can be reused.
CATALOG_STAMP = "catalog-build.json"


@dataclass
class DemoContext:
    """What the stages share."""

    out: Path
    real_data: Path | None = None
    seed: int = 0
    rebuild: bool = False
    profile: str = "demo"
    summary: dict[str, Any] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    catalog_dir: Path | None = None
    served: Any = None  # pipeline.demo.serve.Served once the "serve" stage ran
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def summary_path(self) -> Path:
        return self.out / SUMMARY_FILE

    def record(self, stage: str, figures: dict[str, Any]) -> None:
        """Put a stage's figures into the summary and write it."""
        self.summary.setdefault("stages", {})[stage] = figures
        self.write_summary()

    def write_summary(self) -> None:
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        os.replace(tmp, self.summary_path)


Stage = Callable[[DemoContext], dict[str, Any]]


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- stages
def stage_catalog(ctx: DemoContext) -> dict[str, Any]:
    """Build the embedded catalog under OUT/catalog, or reuse it when built the same way."""
    from .serve import CATALOG_VERSION, CATALOG_VERSION_KEY

    cat = ctx.out / "catalog"
    stamp_path = ctx.out / CATALOG_STAMP
    want = {
        "profile": ctx.profile,
        "seed": ctx.seed,
        "real_data": str(ctx.real_data) if ctx.real_data else None,
        "catalog_version": CATALOG_VERSION,
    }
    have = None
    with contextlib.suppress(OSError, ValueError):
        have = json.loads(stamp_path.read_text())
    reusable = False
    if not ctx.rebuild and have == want and (cat / "catalog.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            reusable = (
                json.loads((cat / "catalog.json").read_text()).get(CATALOG_VERSION_KEY)
                == CATALOG_VERSION
            )
    ctx.catalog_dir = cat
    if reusable:
        _say(f"[catalog] reusing {cat} (profile {ctx.profile}; --rebuild to build it again)")
        return {"dir": str(cat), "reused": True, **want, **_catalog_counts(cat)}
    from .catalog import build_catalog

    if cat.exists():
        if not (cat / "catalog.json").exists() and any(cat.iterdir()):
            raise CatalogError(
                f"{cat} exists and is not an embedded catalog; remove it or choose another --out."
            )
        shutil.rmtree(cat)
    stamp_path.unlink(missing_ok=True)
    src = f"real scenes from {ctx.real_data} + synthetic" if ctx.real_data else "synthetic only"
    _say(f"[catalog] building {cat} (profile {ctx.profile}, {src}) ...")
    result = build_catalog(
        cat, profile=ctx.profile, real_data=ctx.real_data, seed=ctx.seed, progress=True
    )
    stamp_path.write_text(json.dumps(want, indent=2) + "\n")
    figures = {"dir": str(cat), "reused": False, **want, **_catalog_counts(cat)}
    if isinstance(result, dict):
        figures["build"] = result
    return figures


def _catalog_counts(cat: Path) -> dict[str, Any]:
    items = {d.name: len(list(d.glob("*.json"))) for d in sorted((cat / "items").glob("*"))}
    nbytes = sum(p.stat().st_size for p in (cat / "assets").rglob("*.tif"))
    return {"items": items, "asset_bytes": nbytes}


def stage_serve(ctx: DemoContext) -> dict[str, Any]:
    """Serve the catalog (PostgreSQL + pgstac + stac-fastapi-pgstac + asset server)."""
    from .serve import start_catalog_server

    assert ctx.catalog_dir is not None, "the catalog stage runs first"
    _say("[serve] starting the STAC API on loopback ...")
    served = start_catalog_server(ctx.catalog_dir, workdir=ctx.out / "serve", progress=True)
    ctx.stack.callback(served.stop)
    ctx.served = served
    _say(f"[serve] STAC API {served.stac_url}, assets {served.asset_url} "
         f"(up in {served.timings['total_s']:.1f} s)")
    return {
        "stac_url": served.stac_url,
        "asset_url": served.asset_url,
        "loaded": served.counts,
        "startup_seconds": served.timings,
    }


def demo_seasons(year: int = DEMO_YEAR) -> list[tuple[str, str, str]]:
    """The four calendar seasons of the demo year: (name, start, end) as ISO datetimes."""
    edges = [f"{year - 1}-12-01", f"{year}-03-01", f"{year}-06-01", f"{year}-09-01",
             f"{year}-12-01"]
    names = ["DJF", "MAM", "JJA", "SON"]
    return [(n, f"{a}T00:00:00Z", f"{b}T00:00:00Z") for n, a, b in zip(names, edges, edges[1:])]


def stage_catalog_search(ctx: DemoContext) -> dict[str, Any]:
    """Search the served API with pystac-client: per collection x season, per city, clear S2."""
    import pystac_client

    client = pystac_client.Client.open(ctx.served.stac_url)
    collections = sorted(c.id for c in client.get_collections())
    seasons = demo_seasons()
    t = time.perf_counter()
    per_season: dict[str, dict[str, int]] = {}
    for cid in collections:
        per_season[cid] = {}
        for name, start, end in seasons:
            search = client.search(collections=[cid], datetime=f"{start}/{end}", limit=100)
            per_season[cid][name] = sum(1 for _ in search.items())
    per_city: dict[str, dict[str, int]] = {}
    for city in DEMO_CITIES:
        point = {"type": "Point", "coordinates": [city.lon, city.lat]}
        per_city[city.name] = {}
        for cid in collections:
            search = client.search(collections=[cid], intersects=point, limit=100)
            per_city[city.name][cid] = sum(1 for _ in search.items())
    clear = {}
    if "sentinel-2-l2a" in collections:
        search = client.search(
            collections=["sentinel-2-l2a"],
            filter={"op": "<", "args": [{"property": "eo:cloud_cover"}, 20]},
            filter_lang="cql2-json", limit=100,
        )
        clear = {"sentinel-2-l2a_cloud_cover_lt_20": sum(1 for _ in search.items())}
    seconds = time.perf_counter() - t

    width = max(len(c) for c in collections) if collections else 10
    _say(f"[search] items per season of {DEMO_YEAR} (calendar seasons, DJF from December "
         f"{DEMO_YEAR - 1}):")
    _say("    " + "collection".ljust(width) + "".join(f"{n:>6}" for n, _, _ in seasons))
    for cid in collections:
        _say("    " + cid.ljust(width) + "".join(f"{per_season[cid][n]:>6}" for n, _, _ in seasons))
    _say("[search] items covering each demo city: " + "; ".join(
        f"{city} " + "/".join(str(n) for n in counts.values()) for city, counts in per_city.items()
    ) + f" ({' / '.join(collections)})")
    for k, v in clear.items():
        _say(f"[search] {k}: {v}")
    _say(f"[search] {len(collections) * len(seasons) + len(per_city) * len(collections) + 1} "
         f"searches in {seconds:.2f} s")
    return {
        "collections": collections,
        "year": DEMO_YEAR,
        "per_season": per_season,
        "per_city": per_city,
        **clear,
        "search_seconds": round(seconds, 3),
    }


def _demo_config(ctx: DemoContext):  # -> pipeline.config.Config
    from ..config import load_config

    return load_config("demo", overrides={"search": {"stac_url": ctx.served.stac_url}})


def stage_sample(ctx: DemoContext) -> dict[str, Any]:
    """Draw the demo locations around the demo cities (``ssl4eo sample --preset demo``)."""
    from ..sampling import sample, write_locations

    cfg = _demo_config(ctx)
    t = time.perf_counter()
    gdf = sample(cfg.sampling, progress=False)
    path = write_locations(gdf, ctx.out / "locations.parquet", cfg)
    per_city = gdf["city"].value_counts().sort_index().to_dict()
    _say(f"[sample] {len(gdf)} non-overlapping 2.64 km locations around "
         f"{len(per_city)} cities -> {path.name} ({time.perf_counter() - t:.2f} s)")
    plot = _plot_locations(gdf, ctx.out / "locations.png")
    _say(f"[sample] map of the patches: {plot}")
    ctx.state["locations"] = path
    return {"locations": len(gdf), "per_city": per_city, "epsg": sorted(
        int(e) for e in gdf["epsg"].unique()), "file": str(path), "plot": str(plot)}


def _plot_locations(gdf, path: Path) -> Path:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cities = sorted(gdf["city"].unique())
    fig, axes = plt.subplots(1, len(cities), figsize=(3.2 * len(cities), 3.4), squeeze=False)
    for ax, city in zip(axes[0], cities, strict=True):
        sub = gdf[gdf["city"] == city]
        for geom, epsg in zip(sub.geometry, sub["epsg"], strict=True):
            x, y = geom.exterior.xy
            ax.fill(x, y, alpha=0.5, color=f"C{int(epsg) % 10}")
        ax.set_title(f"{city} ({len(sub)})", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
    fig.suptitle("demo locations (patch footprints, colour = UTM zone)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stage_search(ctx: DemoContext) -> dict[str, Any]:
    """Batched scene search on the served API (``ssl4eo search --preset demo``)."""
    import pandas as pd

    from ..search import search_locations

    cfg = _demo_config(ctx)
    path = ctx.out / "scenes.parquet"
    info = search_locations(ctx.state["locations"], path, cfg, progress=True)
    df = pd.read_parquet(path, columns=["modality", "season", "status"])
    ok = df[df["status"] == "ok"].groupby(["modality", "season"]).size().unstack(fill_value=0)
    _say(f"[search] {info['requests']} STAC requests for {info['location_windows']} "
         f"location-windows x {len(cfg.search.modalities)} modalities "
         f"({info['requests_per_location_window']:.3f} per location-window)")
    for m, row in ok.iterrows():
        _say(f"[search]   {m}: scenes chosen per season " + " / ".join(str(int(v)) for v in row))
    if info["missing"]:
        _say(f"[search]   {info['missing']} (location, season, modality) without a scene "
             "(recorded with the reason; stored as nodata)")
    ctx.state["scenes"] = path
    keep = ("requests", "location_windows", "requests_per_location_window", "groups",
            "searches", "items_seen", "missing", "skipped_count")
    return {"file": str(path), **{k: info[k] for k in keep}}


def stage_build(ctx: DemoContext) -> dict[str, Any]:
    """Build the sharded Zarr store on a local Dask cluster (``ssl4eo build``)."""
    from ..runner import BuildOptions, plot_band_stats, run_build

    store_path = ctx.out / "cube.zarr"
    cfg = _demo_config(ctx)
    opts = BuildOptions(shard_samples=8)  # reads with the profile the scenes table recorded
    _say(f"[build] {store_path.name}: one Dask task per shard of {opts.shard_samples} samples")
    summary = run_build(ctx.state["locations"], ctx.state["scenes"], store_path, options=opts,
                        client_options={"threads": 1}, overwrite=True, config=cfg.to_dict(),
                        progress=True)
    st = summary["status"]
    _say(f"[build] {st.get('complete', 0)} of {summary['samples']} samples complete, "
         f"{st.get('failed', 0)} failed; {summary['stored_bytes'] / 1e6:.1f} MB "
         f"({summary['bytes_per_sample'] / 1e6:.2f} MB per sample, 4 seasons)")
    plot = plot_band_stats(summary["band_stats"], ctx.out / "band_stats.png")
    quick = _plot_quicklook(store_path, ctx.out / "quicklook.png")
    _say(f"[build] band statistics: {plot}; RGB + S1 quicklook: {quick}")
    _say(f"[build] open it with: xr.open_zarr('{store_path}', group='S2L2A')")
    ctx.state["store"] = store_path
    return {"store": str(store_path), "samples": summary["samples"], "status": st,
            "groups": summary["groups"], "stored_bytes": summary["stored_bytes"],
            "bytes_per_sample": round(summary["bytes_per_sample"]),
            "failures": summary["failures"], "band_stats": summary["band_stats"],
            "plots": [str(plot), str(quick)]}


def _plot_quicklook(store_path: Path, path: Path, n: int = 4) -> Path:
    """RGB of ``n`` samples over the four seasons, with S1 VV beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import xarray as xr

    s2 = xr.open_zarr(store_path, group="S2L2A")
    s1 = xr.open_zarr(store_path, group="S1RTC") if (store_path / "S1RTC").exists() else None
    n = min(n, s2.sizes["sample"])
    cols = 4 + (4 if s1 is not None else 0)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    for i in range(n):
        rgb = s2["bands"].isel(sample=i).sel(band=["B04", "B03", "B02"]).values.astype("f4")
        for t in range(4):
            img = np.clip((rgb[t] - 1000) / 3000, 0, 1).transpose(1, 2, 0)
            axes[i, t].imshow(img)
            axes[i, t].set_title(f"S2 t{t}", fontsize=7)
        if s1 is not None:
            vv = s1["bands"].isel(sample=i).sel(band="vv").values
            for t in range(4):
                axes[i, 4 + t].imshow(vv[t], cmap="gray", vmin=-25, vmax=0)
                axes[i, 4 + t].set_title(f"S1 VV t{t}", fontsize=7)
        axes[i, 0].set_ylabel(str(s2["sample"].values[i]), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def stage_pretrain_probe(ctx: DemoContext) -> dict[str, Any]:
    """A short CPU pretraining (MoCo-v2, small backbone) on the demo store, then a linear probe
    of the exported weights next to the same backbone with random weights."""
    from ..train.cli import pretrain_and_probe

    eurosat = None
    if ctx.real_data is not None and (ctx.real_data / "eurosat_ms_1pct").is_dir():
        eurosat = ctx.real_data / "eurosat_ms_1pct"
    where = (f"EuroSAT-MS ({eurosat})" if eurosat else
             "the synthetic scenes' known land cover (EuroSAT-MS not found)")
    _say(f"[pretrain] MoCo-v2 on {ctx.state['store'].name} (CPU-sized); probe on {where}")
    result = pretrain_and_probe(str(ctx.state["store"]), ctx.out / "pretrain", method="moco",
                                data_dir=eurosat, catalog_dir=ctx.catalog_dir, progress=True)
    for line in result["text"].splitlines():
        _say(f"[probe] {line}")
    pre, probe = result["pretrain"], result["probe"]
    losses = [h["loss"] for h in pre["history"]]
    return {"method": pre["method"], "arch": pre["arch"], "epochs": pre["epochs"],
            "steps": pre["steps"], "loss_per_epoch": losses, "weights": pre["weights"],
            "probe": {k: v for k, v in probe.items() if not isinstance(v, list | dict)
                      or k in ("pretrained", "random", "classes")}}


def stage_export(ctx: DemoContext) -> dict[str, Any]:
    """The store in SSL4EO-S12 v1.1's file layout (``ssl4eo export v1.1``)."""
    from ..export import export_v11

    out = ctx.out / "v1.1"
    res = export_v11(str(ctx.state["store"]), str(out), split="train", overwrite=True,
                     workers=2, progress=True)
    first = out / "train" / "S2L2A" / res["files"][0]["name"]
    _say(f"[export] {res['samples']} samples as SSL4EO-S12 v1.1 files "
         f"({len(res['files'])} per modality) under {out}; with zarr 2.18: "
         f"xr.open_zarr('{first}')")
    return {"out": str(out), "samples": res["samples"], "files": len(res["files"]),
            "modalities": res["modalities"]}


#: The demo's stages, in order. Later pipeline stages append themselves here.
STAGES: list[tuple[str, Stage]] = [
    ("catalog", stage_catalog),
    ("serve", stage_serve),
    ("catalog_search", stage_catalog_search),
    ("sample", stage_sample),
    ("search", stage_search),
    ("build", stage_build),
    ("export", stage_export),
    ("pretrain_probe", stage_pretrain_probe),
]


def run_demo(
    out: Path,
    *,
    real_data: Path | None = None,
    seed: int = 0,
    rebuild: bool = False,
    profile: str = "demo",
    stages: list[tuple[str, Stage]] | None = None,
) -> dict[str, Any]:
    """Run the demo's stages into ``out``; returns the summary (also in ``out/summary.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out=out.resolve(), real_data=real_data, seed=seed, rebuild=rebuild,
                      profile=profile)
    ctx.summary = {
        "ssl4eo_version": __version__,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "out": str(ctx.out),
        "status": "running",
        "stages": {},
    }
    ctx.write_summary()
    t_all = time.perf_counter()
    current = None
    try:
        with ctx.stack:
            for name, fn in stages if stages is not None else STAGES:
                current = name
                t = time.perf_counter()
                figures = dict(fn(ctx) or {})
                figures["seconds"] = round(time.perf_counter() - t, 3)
                ctx.record(name, figures)
        ctx.summary["status"] = "ok"
    except BaseException as exc:
        ctx.summary["status"] = f"failed in stage {current!r}: {type(exc).__name__}: {exc}"
        raise
    finally:
        ctx.summary["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        ctx.summary["seconds"] = round(time.perf_counter() - t_all, 3)
        ctx.write_summary()
    _say(f"[demo] done in {ctx.summary['seconds']:.1f} s; summary: {ctx.summary_path}")
    return ctx.summary
