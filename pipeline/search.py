"""Batched STAC scene search and scene choice (``ssl4eo search``).

Strategy
--------
Locations are grouped in lon/lat cells (``search.group_cell_deg``). For each group and modality
the season windows of all its locations are merged into time spans (overlapping windows joined,
then cut into pieces of at most ``search.max_query_days``), and each span is one paged STAC search
over the bounding box of the group's patches. Requests therefore grow with groups x spans, not
with locations x windows. Every returned item is then matched to the group's locations
locally: a scene is a candidate for a (location, window) when its acquisition time is in the
half-open window, its footprint contains the whole patch footprint, and it passes the modality's
filters (S2: ``eo:cloud_cover`` strictly below the limit; S1: IW, VV+VH, an allowed orbit state).
The rule then picks one: ``most_recent`` (the paper) or ``least_cloudy`` (ties: most recent,
then item id).

A location without a scene for some season/modality gets a ``missing`` row whose ``reason`` says
why. ``drop_incomplete`` drops such locations entirely (the paper's behaviour); to still end with N
locations, sample more than N (e.g. 1.3 N) and keep the first N complete ones downstream, or
sample again with another seed and search the new ones.

HTTP: pystac-client over a requests session with a urllib3 ``Retry`` (429/5xx and connection
errors, exponential backoff, ``Retry-After`` honoured, POST retried), (connect, read) timeouts and
paging through ``next`` links. An unreachable API fails before any work; a search that still
fails after the retries raises :class:`~pipeline.errors.SearchError` naming the window, area and
collection, and no output is written. Malformed items are skipped and recorded (table metadata,
and the ``reason`` of affected missing rows).

Never signs: ``item_json`` keeps hrefs as the API returned them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import Config
from .errors import ConfigError, SearchError, UserError
from .layout import S1RTC, SCENE_COLUMNS, SCENES_ROW_GROUP
from .providers import Provider, provider_from_config, s2_offset_rule
from .seasons import season_windows

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)


# ------------------------------------------------------------------------------------ HTTP
class RequestCounter:
    """Counts HTTP responses received by the sessions it is attached to (thread-safe)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def hook(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.count += 1
        return response


def make_client(url: str, cfg: Config, counter: RequestCounter | None = None):  # -> Client
    """A pystac-client ``Client`` with timeouts, retries with backoff, and request counting."""
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    s = cfg.search
    retry = Retry(
        total=s.max_retries, connect=s.max_retries, read=s.max_retries,
        status=s.max_retries, backoff_factor=s.backoff_s, status_forcelist=RETRY_STATUS,
        allowed_methods=None, respect_retry_after_header=True, raise_on_status=False,
    )
    timeout = (s.connect_timeout_s, s.timeout_s)
    io = StacApiIO(timeout=timeout, max_retries=retry)
    if counter is not None:
        io.session.hooks["response"].append(counter.hook)
    try:
        # timeout given again: Client.open calls stac_io.update(timeout=...), which would
        # otherwise reset it to None (no read timeout: a stalled API would hang the search)
        return Client.open(url, stac_io=io, timeout=timeout)
    except Exception as exc:
        raise SearchError(
            f"cannot open the STAC API at {url!r}: {exc}. Check the URL (search.stac_url / "
            "--stac-url) and that the API is up"
        ) from exc


def check_reachable(url: str, timeout_s: float) -> None:
    """Fail fast (no retries) when nothing answers at ``url``."""
    import requests

    try:
        r = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise SearchError(
            f"the STAC API at {url!r} is unreachable ({type(exc).__name__}: {exc}). Check the "
            "URL (--stac-url or search.stac_url), your network, or start the local catalog"
        ) from exc
    if r.status_code >= 400:
        raise SearchError(
            f"the STAC API at {url!r} answered HTTP {r.status_code} on its landing page; is this "
            "a STAC API root URL?"
        )


# ------------------------------------------------------------------------------------ items
@dataclass
class Scene:
    """One parsed STAC item, as much of it as the choice needs."""

    item_id: str
    collection: str
    time: np.datetime64  # UTC, ms
    cloud: float  # NaN when not applicable
    geometry: Any  # shapely geometry, EPSG:4326
    props: dict
    item: dict
    #: S2: the scene's DN offset and what decided it (:func:`pipeline.providers.s2_offset_rule`)
    dn_offset: int = 0
    offset_rule: str = ""


class MalformedItem(ValueError):
    """An item that cannot be used; its message is recorded as the skip reason."""


def _utc_ms(value: Any) -> np.datetime64:
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return np.datetime64(ts.tz_localize(None), "ms")


def parse_item(item: dict, modality: str, provider: Provider) -> Scene:
    """Parse one item dict, raising :class:`MalformedItem` with the reason when unusable."""
    import shapely.geometry

    iid = item.get("id")
    if not isinstance(iid, str) or not iid:
        raise MalformedItem("item without an id")
    props = item.get("properties")
    if not isinstance(props, dict):
        raise MalformedItem(f"item {iid!r}: no properties")
    when = props.get("datetime") or props.get("start_datetime")
    if not when:
        raise MalformedItem(f"item {iid!r}: no datetime")
    try:
        t = _utc_ms(when)
    except (ValueError, TypeError) as exc:
        raise MalformedItem(f"item {iid!r}: unreadable datetime {when!r} ({exc})") from None
    try:
        geom = shapely.geometry.shape(item["geometry"])
    except Exception as exc:
        raise MalformedItem(f"item {iid!r}: unreadable geometry ({exc})") from None
    if geom.is_empty or not geom.is_valid:
        geom = geom.buffer(0) if not geom.is_empty else geom
        if geom.is_empty:
            raise MalformedItem(f"item {iid!r}: empty or invalid geometry")
    assets = item.get("assets") or {}
    wanted = provider.band_assets(modality)
    lacking = [b for b, key in wanted.items() if key not in assets or "href" not in assets[key]]
    if lacking:
        raise MalformedItem(f"item {iid!r}: no asset for bands {lacking}")
    cloud = float("nan")
    if modality != S1RTC:
        raw = props.get(provider.cloud_property)
        try:
            cloud = float(raw)
        except (TypeError, ValueError):
            raise MalformedItem(f"item {iid!r}: {provider.cloud_property} is {raw!r}") from None
        if not 0 <= cloud <= 100:
            raise MalformedItem(f"item {iid!r}: {provider.cloud_property}={cloud} not in 0..100")
    offset, rule = 0, ""
    if modality != S1RTC:
        keys = [k for b, k in wanted.items() if b != "SCL"]
        try:
            offset, rule = s2_offset_rule(item, provider.offset_rule, keys)
        except ValueError as exc:
            raise MalformedItem(str(exc)) from None
    return Scene(iid, str(item.get("collection", "")), t, cloud, geom, props, item, offset, rule)


def s1_ok(props: dict, orbit_states: list[str]) -> bool:
    """IW mode, both VV and VH, orbit state allowed."""
    pols = {str(p).upper() for p in props.get("sar:polarizations", [])}
    return (
        props.get("sar:instrument_mode") == "IW"
        and {"VV", "VH"} <= pols
        and str(props.get("sat:orbit_state", "")).lower() in orbit_states
    )


def ranked(scenes: list[Scene], rule: str) -> list[Scene]:
    """The scenes in the rule's order of preference (``most_recent`` or ``least_cloudy``),
    deterministic ties: the first is the rule's choice, the next are its runners-up."""
    if rule == "most_recent":
        return sorted(scenes, key=lambda s: (s.time, s.item_id), reverse=True)
    # least cloudy; NaN (S1) counts as 0, so S1 falls back to most recent
    return sorted(scenes, key=lambda s: (0.0 if np.isnan(s.cloud) else s.cloud,
                                         -s.time.astype("int64"), s.item_id))


def choose(scenes: list[Scene], rule: str) -> Scene | None:
    """The scene the rule picks (``most_recent`` or ``least_cloudy``), deterministic ties."""
    order = ranked(scenes, rule)
    return order[0] if order else None


# ---------------------------------------------------------------------------------- batching
def merge_spans(starts: np.ndarray, ends: np.ndarray, max_days: float) -> list[tuple]:
    """Cover the half-open intervals with few queries, each at most ``max_days`` long.

    Intervals are taken in time order and joined into the current query while the joined span
    stays within ``max_days``, gaps included: fetching the few scenes of a gap costs less than
    another request (the choice filters scenes per location window afterwards). Overlapping
    intervals are always joined; a span longer than ``max_days`` is cut into pieces.
    """
    order = np.argsort(starts, kind="stable")
    step = np.timedelta64(int(max_days * 86400 * 1000), "ms")
    spans: list[list[np.datetime64]] = []
    for s, e in zip(starts[order], ends[order]):
        if spans and (s <= spans[-1][1] or max(spans[-1][1], e) - spans[-1][0] <= step):
            spans[-1][1] = max(spans[-1][1], e)
        else:
            spans.append([s, e])
    out = []
    for s, e in spans:
        while e - s > step:
            out.append((s, s + step))
            s = s + step
        out.append((s, e))
    return out


def _iso(t: np.datetime64) -> str:
    return pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _datetime_arg(start: np.datetime64, end: np.datetime64) -> str:
    """STAC datetime intervals are closed; the window is half-open: end - 1 ms."""
    return f"{_iso(start)}/{_iso(end - np.timedelta64(1, 'ms'))}"


@dataclass
class SearchStats:
    requests: int = 0
    searches: int = 0
    items_seen: int = 0
    skipped: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------ the searcher
class SceneSearch:
    """Searches scenes for a locations table, per the config. Use :meth:`run`."""

    def __init__(self, cfg: Config, provider: Provider | None = None) -> None:
        self.cfg = cfg
        self.provider = provider or provider_from_config(cfg)
        for m in cfg.search.modalities:
            self.provider.collection(m)
        self.counter = RequestCounter()
        self._local = threading.local()

    # ---------------------------------------------------------------- connection and checks
    def client(self):  # -> Client
        c = getattr(self._local, "client", None)
        if c is None:
            c = make_client(self.provider.url, self.cfg, self.counter)
            self._local.client = c
        return c

    def preflight(self) -> None:
        """Reachability (fail fast), then that every collection exists."""
        check_reachable(self.provider.url, self.cfg.search.connect_timeout_s)
        client = self.client()
        for m in self.cfg.search.modalities:
            col = self.provider.collection(m)
            try:
                found = client.get_collection(col)
            except Exception as exc:
                raise SearchError(f"cannot read collection {col!r} at {self.provider.url!r}: "
                                  f"{exc}") from exc
            if found is None:
                raise ConfigError(
                    f"collection {col!r} ({m}) does not exist at {self.provider.url!r}; check "
                    f"the provider ({self.provider.name!r}) and the modalities"
                )

    # ------------------------------------------------------------------------- one search
    def fetch(self, modality: str, bbox: tuple[float, ...] | None, start: np.datetime64,
              end: np.datetime64, intersects: dict | None = None) -> tuple[list[Scene], list]:
        """All usable scenes of ``modality`` in ``[start, end)`` over ``bbox``/``intersects``.

        Pages are followed to the end. Returns (scenes, skipped) where skipped holds
        ``{"item_id", "reason"}`` for malformed items.
        """
        col = self.provider.collection(modality)
        kwargs: dict[str, Any] = {
            "collections": [col], "datetime": _datetime_arg(start, end),
            "limit": min(self.cfg.search.page_size, self.provider.max_page_size),
        }
        if intersects is not None:
            kwargs["intersects"] = intersects
        else:
            kwargs["bbox"] = list(bbox)  # type: ignore[arg-type]
        if modality != S1RTC and self.provider.supports_query:
            kwargs["query"] = {self.provider.cloud_property:
                               {"lt": self.cfg.seasons.max_cloud_cover}}
        scenes: list[Scene] = []
        skipped: list[dict] = []
        where = (f"{col} window {_iso(start)} .. {_iso(end)} over "
                 f"{'the patch' if intersects else 'bbox ' + str([round(b, 4) for b in bbox])}")
        try:
            search = self.client().search(**kwargs)
            for page in search.pages_as_dicts():
                for item in page.get("features", []):
                    try:
                        scenes.append(parse_item(item, modality, self.provider))
                    except MalformedItem as exc:
                        skipped.append({"item_id": str(item.get("id")), "reason": str(exc),
                                        "search": where})
        except Exception as exc:
            raise SearchError(
                f"search for {where} at {self.provider.url!r} failed after "
                f"{self.cfg.search.max_retries} retries: {type(exc).__name__}: {exc}. "
                "No scenes table was written; re-run later (or lower search.workers)"
            ) from exc
        for s in skipped:
            log.warning("skipped malformed item: %s", s["reason"])
        return scenes, skipped

    # ------------------------------------------------------------------- one group x modality
    def search_group(self, modality: str, locs: pd.DataFrame, footprints: np.ndarray,
                     windows: np.ndarray) -> tuple[list[dict], SearchStats]:
        """Rows for the group's locations (``windows`` is ``(n, 4, 2)``)."""
        import shapely

        stats = SearchStats()
        bounds = shapely.bounds(footprints)
        bbox = (bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max())
        spans = merge_spans(windows[:, :, 0].ravel(), windows[:, :, 1].ravel(),
                            self.cfg.search.max_query_days)
        scenes: list[Scene] = []
        seen: set[str] = set()
        for s, e in spans:
            got, skipped = self.fetch(modality, bbox, s, e)
            stats.searches += 1
            stats.skipped += skipped
            for sc in got:  # a scene on a span border may come twice
                if sc.item_id not in seen:
                    seen.add(sc.item_id)
                    scenes.append(sc)
        stats.items_seen += len(scenes)
        rows = choose_for_locations(scenes, modality, locs, footprints, windows, self.cfg,
                                    self.provider, n_skipped=len(stats.skipped),
                                    cloud_filtered_by_api=self.provider.supports_query)
        return rows, stats

    # ------------------------------------------------------------------------------ all
    def run(self, locations: pd.DataFrame, progress: bool = True) -> tuple[pd.DataFrame, dict]:
        """Search scenes for every location; returns (scenes table, info)."""
        from tqdm import tqdm

        if len(locations) == 0:
            raise UserError("the locations table is empty: nothing to search")
        self.preflight()
        t0 = time.perf_counter()
        req0 = self.counter.count
        locations = locations.reset_index(drop=True)
        windows = season_windows(locations["sample"].to_numpy(), self.cfg.seasons)
        footprints = np.asarray(locations.geometry.to_numpy())
        cell = self.cfg.search.group_cell_deg
        keys = (np.floor(locations["lon"].to_numpy() / cell).astype(np.int64) * 100_000
                + np.floor(locations["lat"].to_numpy() / cell).astype(np.int64))
        groups = [np.flatnonzero(keys == k) for k in np.unique(keys)]
        jobs = [(m, g) for g in groups for m in self.cfg.search.modalities]
        rows: list[dict] = []
        total = SearchStats()
        with ThreadPoolExecutor(max_workers=self.cfg.search.workers) as pool:
            futures = [pool.submit(self.search_group, m, locations.iloc[g], footprints[g],
                                   windows[g]) for m, g in jobs]
            try:
                for fut in tqdm(as_completed(futures), total=len(futures), unit="search",
                                desc="searching", disable=not progress, leave=False):
                    r, st = fut.result()
                    rows += r
                    total.searches += st.searches
                    total.items_seen += st.items_seen
                    total.skipped += st.skipped
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        df = scenes_frame(rows)
        dropped: list[str] = []
        if self.cfg.search.drop_incomplete:
            bad = set(df.loc[df["status"] != "ok", "sample"])
            dropped = sorted(bad)
            df = df[~df["sample"].isin(bad)].reset_index(drop=True)
        secs = time.perf_counter() - t0
        n_lw = len(locations) * 4
        requests = self.counter.count - req0
        info = {
            "provider": self.provider.name, "stac_url": self.provider.url,
            "profile": self.provider.to_dict(),
            "locations": len(locations), "groups": len(groups), "searches": total.searches,
            "requests": requests, "location_windows": n_lw,
            "requests_per_location_window": requests / (n_lw * len(self.cfg.search.modalities)),
            "items_seen": total.items_seen, "seconds": round(secs, 3),
            "missing": int((df["status"] != "ok").sum()),
            "dropped_samples": dropped,
            "skipped_items": total.skipped[:1000], "skipped_count": len(total.skipped),
        }
        return df, info


# ------------------------------------------------------------------- STAC GeoParquet snapshots
#: columns a STAC GeoParquet snapshot needs (stac-geoparquet's layout: item fields and
#: properties as top-level columns, ``geometry`` as WKB, ``bbox`` as a struct or absent)
SNAPSHOT_COLUMNS = ("id", "collection", "datetime", "geometry", "assets")
#: decoded snapshot row groups kept in memory by one search (bytes, Arrow's count)
SNAPSHOT_CACHE_BYTES = 1 << 30


class SnapshotSearch(SceneSearch):
    """The same search and choice as :class:`SceneSearch`, over STAC GeoParquet snapshots
    instead of a STAC API: no request to any API, no 429s at 250,000 locations.

    ``items``: paths or URLs (``s3://``, ``az://``, ``gs://``, ``https://``) of GeoParquet files
    or folders of them (Planetary Computer publishes one per collection as the collection's
    ``geoparquet-items`` asset; ``stac-geoparquet`` and ``rustac`` write them). Each
    (group, span) query of the batched search becomes a filtered scan: collection, datetime in
    the span, ``bbox`` overlapping the group (pushed down to the row groups' statistics when
    the snapshot has a ``bbox`` struct) and, for S2, the cloud limit, as the API search does.
    The rows that pass are turned back into item dicts by ``stac_geoparquet`` and go through
    the same :func:`parse_item` and :func:`choose_for_locations` as the API's items.
    """

    def __init__(self, cfg: Config, items: Sequence[str], provider: Provider | None = None
                 ) -> None:
        if provider is None:
            from .providers import get_provider

            # no API: a profile without a URL (the local one) is fine here
            provider = get_provider(cfg.search.provider, cfg.search.stac_url, cfg.providers,
                                    need_url=False)
        super().__init__(cfg, provider)
        if not items:
            raise UserError("no STAC GeoParquet snapshot given (--items PATH_OR_URL)")
        self.sources = [str(i) for i in items]
        self._datasets: dict[str, list[Any]] = {}
        self._bbox_struct: dict[int, bool] = {}
        # decoded row groups, least recently used first: neighbouring groups' queries hit
        # the same row groups, which would otherwise be fetched and decoded once per query
        self._cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._fragments: dict[int, list[Any]] = {}

    def preflight(self) -> None:
        """Open every snapshot, check its columns, and find each modality's collection."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        from . import storage

        opened = []
        for src in self.sources:
            shown = storage.redact(src)
            if storage.is_remote(src):
                storage.input_info(src, "STAC GeoParquet snapshot")
            elif not Path(src).exists():
                raise UserError(f"STAC GeoParquet snapshot {shown!r} does not exist; give a "
                                "file or folder written by stac-geoparquet / rustac (e.g. a "
                                "collection's geoparquet-items asset)")
            fs, where = storage.arrow_filesystem(src)
            try:
                ds = pads.dataset(where, filesystem=fs, format="parquet")
                names = set(ds.schema.names)
            except Exception as exc:  # pyarrow raises several types for damaged files
                raise UserError(f"{shown!r} is not a readable GeoParquet snapshot: "
                                f"{storage.redact(str(exc))}") from exc
            lacking = [c for c in SNAPSHOT_COLUMNS if c not in names]
            if lacking:
                raise UserError(f"STAC GeoParquet snapshot {shown!r} lacks column(s) {lacking} "
                                f"(it has {sorted(names)[:12]}...); write it with "
                                "stac-geoparquet or rustac from STAC items")
            bbox_type = ds.schema.field("bbox").type if "bbox" in names else None
            self._bbox_struct[id(ds)] = bool(bbox_type is not None
                                             and str(bbox_type).startswith("struct"))
            opened.append((src, ds, names))
        pname = self.provider.name
        for m in self.cfg.search.modalities:
            col = self.provider.collection(m)
            having = [(src, ds, names) for src, ds, names in opened
                      if ds.count_rows(filter=pc.field("collection") == col) > 0]
            if not having:
                raise ConfigError(
                    f"no item of collection {col!r} ({m}) in the snapshot(s) "
                    f"{[storage.redact(s) for s in self.sources]}; give the snapshot of that "
                    f"collection, or fix providers.{pname}.modalities.{m}.collection"
                )
            if m != S1RTC:
                for src, _, names in having:
                    if self.provider.cloud_property not in names:
                        raise ConfigError(
                            f"snapshot {storage.redact(src)!r} has no "
                            f"{self.provider.cloud_property!r} column for {m}'s cloud filter; "
                            f"fix providers.{pname}.cloud_property (its columns: "
                            f"{sorted(n for n in names if 'cloud' in n)})"
                        )
            self._datasets[m] = [ds for _, ds, _ in having]

    def fetch(self, modality: str, bbox: tuple[float, ...] | None, start: np.datetime64,
              end: np.datetime64, intersects: dict | None = None) -> tuple[list[Scene], list]:
        """The snapshot's rows for one query of the batched search (see the class notes)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import shapely
        from stac_geoparquet.arrow import stac_table_to_items

        col = self.provider.collection(modality)
        t0 = pa.scalar(pd.Timestamp(start).tz_localize("UTC"), pa.timestamp("us", "UTC"))
        t1 = pa.scalar(pd.Timestamp(end).tz_localize("UTC"), pa.timestamp("us", "UTC"))
        base = ((pc.field("collection") == col) & (pc.field("datetime") >= t0)
                & (pc.field("datetime") < t1))
        if modality != S1RTC and self.provider.supports_query:
            base = base & (pc.field(self.provider.cloud_property)
                           < self.cfg.seasons.max_cloud_cover)
        area = (shapely.geometry.shape(intersects) if intersects is not None
                else shapely.box(*bbox))  # type: ignore[misc]
        x0, y0, x1, y1 = area.bounds
        scenes: list[Scene] = []
        skipped: list[dict] = []
        where = f"{col} window {_iso(start)} .. {_iso(end)} in the snapshot"
        for ds in self._datasets.get(modality, []):
            filt = base
            if self._bbox_struct.get(id(ds)):
                filt = filt & ((pc.field("bbox", "xmin") <= x1) & (pc.field("bbox", "xmax") >= x0)
                               & (pc.field("bbox", "ymin") <= y1)
                               & (pc.field("bbox", "ymax") >= y0))
            parts = [t.filter(filt) for t in self._row_groups(ds, filt)]
            parts = [t for t in parts if t.num_rows]
            if not parts:
                continue
            table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            for item in stac_table_to_items(table):
                try:
                    sc = parse_item(item, modality, self.provider)
                except MalformedItem as exc:
                    skipped.append({"item_id": str(item.get("id")), "reason": str(exc),
                                    "search": where})
                    continue
                if sc.geometry.intersects(area):  # what the API's spatial filter does
                    scenes.append(sc)
        for s in skipped:
            log.warning("skipped malformed item: %s", s["reason"])
        return scenes, skipped

    def _row_groups(self, ds: Any, filt: Any):  # -> Iterator[pa.Table]
        """The row groups of ``ds`` whose statistics may hold rows passing ``filt`` (the
        others are never fetched), decoded once and kept in an LRU of
        :data:`SNAPSHOT_CACHE_BYTES`."""
        frags = self._fragments.get(id(ds))
        if frags is None:  # footers read once: row groups are pruned on their statistics
            frags = list(ds.get_fragments())
            for frag in frags:
                frag.ensure_complete_metadata()
            self._fragments[id(ds)] = frags
        for frag in frags:
            for rg in frag.split_by_row_group(filter=filt):
                key = (frag.path, rg.row_groups[0].id)
                with self._cache_lock:
                    table = self._cache.get(key)
                    if table is not None:
                        self._cache.move_to_end(key)
                if table is None:
                    table = rg.to_table()
                    with self._cache_lock:
                        if key not in self._cache:
                            self._cache[key] = table
                            self._cache_bytes += table.nbytes
                        while self._cache_bytes > SNAPSHOT_CACHE_BYTES and len(self._cache) > 1:
                            _, old = self._cache.popitem(last=False)
                            self._cache_bytes -= old.nbytes
                yield table

    def run(self, locations: pd.DataFrame, progress: bool = True) -> tuple[pd.DataFrame, dict]:
        df, info = super().run(locations, progress)
        from . import storage

        info.update(stac_url=None, items=[storage.redact(s) for s in self.sources])
        return df, info


def choose_for_locations(scenes: list[Scene], modality: str, locs: pd.DataFrame,
                         footprints: np.ndarray, windows: np.ndarray, cfg: Config,
                         provider: Provider, n_skipped: int = 0,
                         cloud_filtered_by_api: bool = False) -> list[dict]:
    """Pick a scene per (location, season) among ``scenes``; one row each."""
    import shapely

    n = len(locs)
    k = len(scenes)
    times = np.array([s.time for s in scenes], dtype="datetime64[ms]")
    covers = np.zeros((k, n), dtype=bool)
    touches = np.zeros((k, n), dtype=bool)
    for i, sc in enumerate(scenes):
        shapely.prepare(sc.geometry)
        touches[i] = shapely.intersects(sc.geometry, footprints)
        covers[i] = touches[i] & shapely.contains(sc.geometry, footprints)
    if modality == S1RTC:
        passing = np.array([s1_ok(s.props, cfg.search.s1_orbit_states) for s in scenes],
                           dtype=bool)
        why = f"is IW with VV+VH in orbit states {cfg.search.s1_orbit_states}"
    else:
        passing = np.array([s.cloud < cfg.seasons.max_cloud_cover for s in scenes], dtype=bool)
        why = f"has {provider.cloud_property} < {cfg.seasons.max_cloud_cover:g}"
    col = provider.collection(modality)
    samples = locs["sample"].to_numpy()
    rows = []
    for j in range(n):
        for season in range(4):
            w0, w1 = windows[j, season]
            in_w = (times >= w0) & (times < w1) if k else np.zeros(0, dtype=bool)
            cand = np.flatnonzero(in_w & covers[:, j] & passing)
            order = ranked([scenes[i] for i in cand], cfg.seasons.choice)
            chosen = order[0] if order else None
            # S2: the runners-up, for the build's patch-level cloud choice
            others = order[1:cfg.seasons.candidates] if modality != S1RTC else []
            row = {"sample": samples[j], "season": season, "modality": modality,
                   "window_start": w0, "window_end": w1, "collection": col}
            if chosen is not None:
                row.update(status="ok", reason="", item_id=chosen.item_id,
                           datetime=chosen.time, cloud_cover=chosen.cloud,
                           item_json=json.dumps(chosen.item, separators=(",", ":")),
                           dn_offset=chosen.dn_offset, offset_rule=chosen.offset_rule,
                           candidates=json.dumps([o.item for o in others],
                                                 separators=(",", ":")) if others else "")
            else:
                n_touch = int((in_w & touches[:, j]).sum()) if k else 0
                n_cover = int((in_w & covers[:, j]).sum()) if k else 0
                if n_touch == 0 and modality != S1RTC and cloud_filtered_by_api:
                    # the API filtered on cloud cover: cloudy scenes never came back
                    reason = (f"no scene with {provider.cloud_property} < "
                              f"{cfg.seasons.max_cloud_cover:g} in the window intersects the "
                              "patch")
                elif n_touch == 0:
                    reason = "no scene in the window intersects the patch"
                elif n_cover == 0:
                    reason = (f"{n_touch} scene(s) in the window intersect the patch but none "
                              "covers all of it")
                else:
                    reason = f"{n_cover} scene(s) cover the patch but none {why}"
                if n_skipped:
                    reason += f" ({n_skipped} malformed item(s) skipped in this area)"
                row.update(status="missing", reason=reason, item_id="", datetime=None,
                           cloud_cover=float("nan"), item_json="", dn_offset=0, offset_rule="",
                           candidates="")
            rows.append(row)
    return rows


def scenes_frame(rows: list[dict]) -> pd.DataFrame:
    """The scenes table (columns :data:`SCENE_COLUMNS`), sorted by sample, season, modality."""
    df = pd.DataFrame(rows, columns=list(SCENE_COLUMNS))
    df["season"] = df["season"].astype("int8")
    for c in ("window_start", "window_end", "datetime"):
        df[c] = pd.to_datetime(df[c]).dt.tz_localize("UTC")
    df["cloud_cover"] = df["cloud_cover"].astype("float32")
    df["dn_offset"] = df["dn_offset"].fillna(0).astype("int16")
    for c in ("sample", "modality", "status", "reason", "collection", "item_id", "item_json",
              "offset_rule", "candidates"):
        df[c] = df[c].astype(str)
    return df.sort_values(["sample", "season", "modality"], kind="stable").reset_index(drop=True)


def scenes_from_page(page: dict, modality: str, locations: pd.DataFrame, cfg: Config,
                     provider: Provider) -> tuple[pd.DataFrame, list[dict]]:
    """Scenes table for ``locations`` from one recorded search page (no HTTP)."""
    scenes, skipped = [], []
    for item in page.get("features", []):
        try:
            scenes.append(parse_item(item, modality, provider))
        except MalformedItem as exc:
            skipped.append({"item_id": str(item.get("id")), "reason": str(exc)})
    locations = locations.reset_index(drop=True)
    windows = season_windows(locations["sample"].to_numpy(), cfg.seasons)
    rows = choose_for_locations(scenes, modality, locations,
                                np.asarray(locations.geometry.to_numpy()), windows, cfg,
                                provider, len(skipped))
    return scenes_frame(rows), skipped


# -------------------------------------------------------------------------------- files
def write_scenes(df: pd.DataFrame, path: str | Path, cfg: Config, info: dict) -> Path:
    """Write the scenes table atomically (temp file + rename), flagged complete, in row groups
    of :data:`~pipeline.layout.SCENES_ROW_GROUP` rows: ``df`` sorted by sample (as
    :func:`scenes_frame` makes it), a shard task then reads only its own rows' groups."""
    import pyarrow as pa

    from .sampling import write_table

    table = pa.Table.from_pandas(df[list(SCENE_COLUMNS)], preserve_index=False)
    return write_table(table, path, "scenes", cfg, f"{info.get('provider')} "
                       f"{info.get('stac_url')}", True, info,
                       row_group_size=SCENES_ROW_GROUP)


def read_scenes(path: str | Path, allow_incomplete: bool = False) -> pd.DataFrame:
    """Read a scenes table, refusing incomplete or foreign files."""
    from . import storage
    from .sampling import check_table

    check_table(path, "scenes", allow_incomplete)
    fs, where = storage.arrow_filesystem(path)
    return pd.read_parquet(where, filesystem=fs)


def search_locations(locations_path: str | Path, out: str | Path, cfg: Config,
                     progress: bool = True, items: Sequence[str] | None = None) -> dict:
    """Read locations, search, write the scenes table. Returns the info dict. ``items``:
    STAC GeoParquet snapshots to search instead of the API (:class:`SnapshotSearch`)."""
    from .sampling import read_locations

    gdf = read_locations(locations_path)
    searcher = SnapshotSearch(cfg, items) if items else SceneSearch(cfg)
    df, info = searcher.run(gdf, progress=progress)
    write_scenes(df, out, cfg, info)
    return info


# --------------------------------------------------------------------------------------- CLI
def add_commands(subparsers: Any) -> None:
    """``ssl4eo search``."""
    from .config import add_config_arguments

    p = subparsers.add_parser(
        "search", help="find the scene per location, season and modality (scenes table)",
        description="Batched STAC searches for every location's four season windows.",
    )
    add_config_arguments(p)
    p.add_argument("--locations", "-l", required=True,
                   help="locations GeoParquet (ssl4eo sample): a path or an object-storage URL")
    p.add_argument("--out", "-o", required=True,
                   help="output scenes Parquet: a path or an object-storage URL (s3://, az://, "
                   "gs://; credentials from the environment)")
    p.add_argument("--provider", default=None,
                   help="planetary-computer (default), earth-search or local")
    p.add_argument("--stac-url", default=None, help="STAC API URL (default: the provider's)")
    p.add_argument("--items", nargs="+", default=None, metavar="PATH_OR_URL",
                   help="search STAC GeoParquet snapshots instead of the API (files or folders, "
                   "local or s3://, az://, gs://, https://; e.g. Planetary Computer's "
                   "geoparquet-items asset per collection): the same choice, no API requests. "
                   "The provider profile still gives collection ids, asset keys and the cloud "
                   "property")
    p.add_argument("--modalities", nargs="+", default=None, help="e.g. S2L2A S1RTC")
    p.add_argument("--max-cloud", type=float, default=None,
                   help="S2: keep scenes with eo:cloud_cover below this percentage")
    p.add_argument("--choice", choices=["most_recent", "least_cloudy"], default=None,
                   help="which passing scene a window takes")
    p.add_argument("--orbit-states", nargs="+", choices=["ascending", "descending"],
                   default=None, help="S1 orbit states to accept (default both)")
    p.add_argument("--drop-incomplete", action="store_true", default=None,
                   help="drop locations lacking any season or modality (the paper)")
    p.add_argument("--workers", type=int, default=None, help="concurrent searches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: Any) -> int:
    from .config import load_config

    cfg = load_config(args.preset, args.config, {
        "search": {"provider": args.provider, "stac_url": args.stac_url,
                   "modalities": args.modalities, "s1_orbit_states": args.orbit_states,
                   "drop_incomplete": args.drop_incomplete, "workers": args.workers},
        "seasons": {"max_cloud_cover": args.max_cloud, "choice": args.choice},
    })
    info = search_locations(args.locations, args.out, cfg, progress=not args.no_progress,
                            items=args.items)
    print(json.dumps({k: v for k, v in info.items() if k not in ("skipped_items",
                                                                 "dropped_samples")}))
    return 0
