"""STAC provider profiles: the only place that knows a provider's metadata.

A :class:`Provider` says which STAC API to talk to, which collection holds each modality,
which asset key holds each band, how to sign hrefs, and which item properties carry what.

API used by the later stages (the cube)::

    p = get_provider("planetary-computer")          # or "earth-search", "local" (+ url=...)
    p.collection("S2L2A")                            # 'sentinel-2-l2a'
    p.asset_key("S2L2A", "B04")                      # 'B04' on PC, 'red' on Earth Search
    p.band_assets("S2L2A")                           # {'B01': 'B01', ..., 'SCL': 'SCL'}
    p.sign(href)                                     # a readable URL (SAS token on PC)
    p.signer()                                       # a picklable callable href -> href
    p.drop_tokens()                                  # forget cached tokens (after a 403)
    p.with_signer(load_signer("mypkg.auth:sign"))    # a custom signer (private buckets)

Hrefs in search output are never signed: sign just before reading (PC tokens expire).
Band names are the SSL4EO-S12 v1.1 names in :data:`pipeline.layout.BANDS`, plus ``SCL`` for S2 L2A
(the scene classification used for the cloud mask).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ConfigError
from .layout import BANDS, S1RTC, S2L1C, S2L2A

# -------------------------------------------------------------------------- asset key tables
_S2_PC_L2A = {b: b for b in BANDS[S2L2A]} | {"SCL": "SCL"}
_S2_PC_L1C = {b: b for b in BANDS[S2L1C]}
_S1_PC_RTC = {"vv": "vv", "vh": "vh"}

# Earth Search v1 (element84) names assets by common name.
_ES_NAMES = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1",
    "B06": "rededge2", "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09",
    "B10": "cirrus", "B11": "swir16", "B12": "swir22", "SCL": "scl",
}
_S2_ES_L2A = {b: _ES_NAMES[b] for b in (*BANDS[S2L2A], "SCL")}
_S2_ES_L1C = {b: _ES_NAMES[b] for b in BANDS[S2L1C]}


def _identity(href: str) -> str:
    return href


def _pc_sign(href: str) -> str:
    import planetary_computer

    return planetary_computer.sign(href)


def _pc_drop_tokens() -> None:
    """Forget the SAS tokens planetary-computer caches (``planetary_computer.sas.TOKEN_CACHE``,
    keyed by token request URL, refreshed only when less than 60 s remain): after a 403 the
    storage account refused a token the cache still holds (revoked, clock skew, issued
    pre-expired), so the next ``sign`` must ask the token service again."""
    try:
        from planetary_computer import sas
    except ImportError:
        return
    sas.TOKEN_CACHE.clear()


#: signers may carry ``cache_clear()`` (as :func:`functools.cache` functions do): it drops their
#: cached tokens, and :meth:`Provider.drop_tokens` calls it before re-signing after a 403
_pc_sign.cache_clear = _pc_drop_tokens  # type: ignore[attr-defined]


def drop_signer_tokens(signer: Callable[[str], str] | None) -> None:
    """Call the signer's ``cache_clear()``, if it has one: its cached tokens are forgotten and
    the next href it signs gets a fresh token. Done when a read was refused with HTTP 401/403
    (:class:`pipeline.cube.RetryingRioReader`)."""
    clear = getattr(signer, "cache_clear", None)
    if callable(clear):
        clear()


def load_signer(spec: str) -> Callable[[str], str]:
    """The signing function named by ``spec`` = ``"package.module:function"``.

    For private buckets or token services other than Planetary Computer's: the function takes
    an href and returns a readable URL (e.g. with a token or a pre-signed query). It is
    imported where the reads happen (inside each Dask task), so it must be importable on the
    workers, and it should read its credentials from their environment, never from arguments
    (nothing secret travels through the task graph or lands in the store). If it caches
    tokens, give it a ``cache_clear()`` attribute: it is called after an HTTP 403, before the
    items are signed again.
    """
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise ConfigError(
            f"signer {spec!r} is not of the form 'package.module:function' (e.g. "
            "'mypkg.auth:sign'); give the import path of a function href -> signed href"
        )
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"signer {spec!r}: cannot import module {module!r} ({exc}); install it where the "
            "build runs (the Dask workers too) or fix the name"
        ) from exc
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"signer {spec!r}: module {module!r} has no attribute {name!r}")
    if not callable(obj):
        raise ConfigError(f"signer {spec!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[return-value]


#: the query of a URL (where tokens live) inside free text, e.g. an error message; and any other
#: ``?key=value...`` (GDAL quotes a dataset as ``B04.tif?se=..&sig=..``, without the URL)
_URL_QUERY = re.compile(r"((?:https?|s3|gs|az|abfss?)://[^\s'\"?#<>]+)\?[^\s'\"<>)]*")
_QUERY = re.compile(r"\?[\w.~%-]+=[^\s'\"<>),]*")


def redact_hrefs(text: str) -> str:
    """``text`` with the query string of every URL in it replaced by ``<redacted>``.

    Signed hrefs carry their token in the query (``?st=..&se=..&sig=..`` on Azure, ``?X-Amz-
    Signature=..`` pre-signed S3): messages that may quote one (read errors, logs, the failure
    reasons stored in the store) go through this first.
    """
    return _QUERY.sub("?<redacted>", _URL_QUERY.sub(r"\1?<redacted>", str(text)))


@dataclass(frozen=True)
class Provider:
    """One STAC provider's profile. Build with :func:`get_provider`."""

    name: str
    url: str
    #: modality -> collection id
    collections: dict[str, str]
    #: modality -> {band name -> asset key}
    assets: dict[str, dict[str, str]]
    #: href signer, applied only just before reading
    signer_func: Callable[[str], str] = _identity
    #: the item property with the scene cloud percentage (optical modalities)
    cloud_property: str = "eo:cloud_cover"
    #: whether the API accepts the STAC ``query`` extension (used for the cloud filter)
    supports_query: bool = True
    #: largest page size the API accepts
    max_page_size: int = 1000
    notes: tuple[str, ...] = field(default_factory=tuple)

    def has(self, modality: str) -> bool:
        """Whether this provider serves ``modality``."""
        return modality in self.collections

    def collection(self, modality: str) -> str:
        """The collection id holding ``modality`` (``S2L2A``, ``S2L1C``, ``S1RTC``)."""
        try:
            return self.collections[modality]
        except KeyError:
            raise ConfigError(
                f"provider {self.name!r} has no collection for modality {modality!r}; it serves "
                f"{', '.join(self.collections)}. Choose another modality or provider."
            ) from None

    def band_assets(self, modality: str) -> dict[str, str]:
        """``{band name: asset key}`` for every band of ``modality`` (plus SCL for S2 L2A)."""
        self.collection(modality)
        return dict(self.assets[modality])

    def asset_key(self, modality: str, band: str) -> str:
        """The asset key under which ``band`` of ``modality`` is stored in this provider's items."""
        table = self.band_assets(modality)
        try:
            return table[band]
        except KeyError:
            raise ConfigError(
                f"band {band!r} is not a {modality} band of provider {self.name!r}; known bands: "
                f"{', '.join(table)}"
            ) from None

    def sign(self, href: str) -> str:
        """A readable URL for ``href`` (Planetary Computer: appends a SAS token)."""
        return self.signer_func(href)

    def signer(self) -> Callable[[str], str]:
        """A picklable ``href -> href`` callable (ship it to Dask workers)."""
        return self.signer_func

    def drop_tokens(self) -> None:
        """Forget the signer's cached tokens, so that the next :meth:`sign` gets fresh ones
        (see :func:`drop_signer_tokens`)."""
        drop_signer_tokens(self.signer_func)

    def with_signer(self, signer: Callable[[str], str]) -> Provider:
        """This profile with another signer (e.g. :func:`load_signer`'s)."""
        return dataclasses.replace(self, signer_func=signer)

    def sign_item(self, item: dict) -> dict:
        """A copy of the item dict with every asset href signed."""
        out = dict(item)
        out["assets"] = {
            k: {**a, "href": self.sign(a["href"])} for k, a in item.get("assets", {}).items()
        }
        return out


PC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
EARTH_SEARCH_URL = "https://earth-search.aws.element84.com/v1"

PROVIDER_NAMES = ("planetary-computer", "earth-search", "local")


def get_provider(name: str, url: str | None = None) -> Provider:
    """The profile ``name`` (one of :data:`PROVIDER_NAMES`), optionally at another ``url``."""
    if name == "planetary-computer":
        return Provider(
            name=name,
            url=url or PC_URL,
            collections={S2L2A: "sentinel-2-l2a", S1RTC: "sentinel-1-rtc"},
            assets={S2L2A: _S2_PC_L2A, S1RTC: _S1_PC_RTC},
            signer_func=_pc_sign,
            notes=(
                "S2 L2A: +1000 DN offset from processing baseline 04.00 (s2:processing_baseline)",
                "S2 L2A: proj:shape/proj:transform per asset (10/20/60 m)",
                "S1 RTC: linear gamma0 float32, nodata -32768; proj:* at item level, "
                "9-element transform",
            ),
        )
    if name == "earth-search":
        return Provider(
            name=name,
            url=url or EARTH_SEARCH_URL,
            collections={S2L2A: "sentinel-2-l2a", S2L1C: "sentinel-2-l1c"},
            assets={S2L2A: _S2_ES_L2A, S2L1C: _S2_ES_L1C},
            notes=(
                "asset keys are common names (blue, green, red, nir, ...)",
                "no Sentinel-1 RTC collection (sentinel-1-grd is requester-pays, radar geometry)",
            ),
        )
    if name == "local":
        if not url:
            raise ConfigError(
                "provider 'local' needs the URL of the served catalog: pass --stac-url "
                "(printed by the demo catalog's serve command) or set search.stac_url"
            )
        return Provider(
            name=name,
            url=url,
            collections={S2L2A: "sentinel-2-l2a", S1RTC: "sentinel-1-rtc"},
            assets={S2L2A: _S2_PC_L2A, S1RTC: _S1_PC_RTC},
            notes=("the embedded catalog mirrors Planetary Computer's collection ids and keys",),
        )
    raise ConfigError(
        f"unknown provider {name!r}: choose one of {', '.join(PROVIDER_NAMES)}"
    )


@functools.cache
def _cached(name: str, url: str | None) -> Provider:
    return get_provider(name, url)


def provider_from_config(search_cfg) -> Provider:  # type: ignore[no-untyped-def]
    """The provider named in a :class:`pipeline.config.SearchConfig`."""
    return _cached(search_cfg.provider, search_cfg.stac_url)


# ------------------------------------------------------------------ item metadata (PC layout)
@dataclass(frozen=True)
class AssetGrid:
    """The pixel grid of one asset: CRS, affine transform (6 numbers, GDAL order a..f) and shape."""

    epsg: int
    transform: tuple[float, float, float, float, float, float]
    shape: tuple[int, int]  # (rows, cols)

    @property
    def resolution(self) -> float:
        """Pixel size in CRS units (x)."""
        return abs(self.transform[0])


def _epsg_of(props: dict) -> int | None:
    if props.get("proj:epsg") is not None:
        return int(props["proj:epsg"])
    code = props.get("proj:code")
    if isinstance(code, str) and code.upper().startswith("EPSG:"):
        return int(code.split(":", 1)[1])
    return None


def asset_grid(item: dict, asset_key: str) -> AssetGrid:
    """The grid of ``asset_key`` in a STAC item dict.

    ``proj:*`` is read from the asset first, then the item (PC S2 L2A keeps shape and transform
    per asset, 10/20/60 m; PC S1 RTC keeps them at item level with a 9-element transform, whose
    last row ``0, 0, 1`` is dropped here). Raises ``ValueError`` naming the item when missing.
    """
    asset = item.get("assets", {}).get(asset_key)
    if asset is None:
        raise ValueError(f"item {item.get('id')!r} has no asset {asset_key!r}")
    props = item.get("properties", {})
    epsg = _epsg_of(asset) or _epsg_of(props)
    transform = asset.get("proj:transform", props.get("proj:transform"))
    shape = asset.get("proj:shape", props.get("proj:shape"))
    if epsg is None or transform is None or shape is None:
        raise ValueError(
            f"item {item.get('id')!r} asset {asset_key!r} lacks proj:epsg/proj:code, "
            "proj:transform or proj:shape"
        )
    if len(transform) == 9:
        if list(transform[6:]) != [0, 0, 1]:
            raise ValueError(f"item {item.get('id')!r}: 9-element proj:transform whose last row "
                             f"is {transform[6:]}, not [0, 0, 1]")
        transform = transform[:6]
    if len(transform) != 6:
        raise ValueError(f"item {item.get('id')!r} asset {asset_key!r}: proj:transform must have "
                         f"6 or 9 elements, has {len(transform)}")
    if transform[4] >= 0:
        raise ValueError(f"item {item.get('id')!r} asset {asset_key!r}: proj:transform has a "
                         f"non-negative y pixel size {transform[4]} (north-up grids only)")
    return AssetGrid(int(epsg), tuple(float(t) for t in transform),  # type: ignore[arg-type]
                     (int(shape[0]), int(shape[1])))


def processing_baseline(item: dict) -> str | None:
    """``s2:processing_baseline`` (e.g. ``'04.00'``) or ``None`` (S1, or not recorded)."""
    value = item.get("properties", {}).get("s2:processing_baseline")
    return None if value is None else str(value)


def s2_offset(item: dict) -> int:
    """DN offset of an S2 L2A item's reflectances: 1000 from baseline 04.00 on, else 0.

    Baselines are compared as (major, minor) numbers, so ``'04.00'``, ``'05.09'`` and ESA's
    reprocessing marker ``'99.99'`` give 1000, ``'02.12'``, ``'03.01'`` give 0. Without
    ``s2:processing_baseline`` the product id's ``_Nxxyy_`` part decides, and without that the
    acquisition date (baseline 04.00 started on 2022-01-25). The one place that decides it.
    """
    import re

    from .layout import S2_BASELINE_OFFSET, S2_OFFSET_BASELINE

    props = item.get("properties", {})
    b = processing_baseline(item)
    if b is None:
        pid = str(props.get("s2:product_uri") or item.get("id", ""))
        m = re.search(r"_N(\d{2})(\d{2})_", pid)
        if m:
            b = f"{m.group(1)}.{m.group(2)}"
        elif not (str(item.get("collection", "")).startswith("sentinel-2")
                  or str(item.get("id", "")).startswith("S2")):
            return 0  # not a Sentinel-2 item: no reflectance offset
        else:
            when = str(props.get("datetime") or "")
            return S2_BASELINE_OFFSET if when >= "2022-01-25" else 0
    try:
        major, minor = (int(x) for x in b.split(".")[:2])
    except ValueError:
        raise ValueError(f"item {item.get('id')!r}: unreadable s2:processing_baseline {b!r}") from None
    ref = tuple(int(x) for x in S2_OFFSET_BASELINE.split("."))
    return S2_BASELINE_OFFSET if (major, minor) >= ref else 0
