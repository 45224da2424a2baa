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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .layout import BANDS, MODALITIES, S2L2A


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
    #: how hrefs are signed: ``none``, ``planetary-computer`` or ``package.module:function``
    signing: str = "none"
    #: where each S2 scene's DN offset comes from (:data:`OFFSET_RULES`, :func:`s2_offset_rule`)
    offset_rule: str = "metadata"
    #: GDAL options for reading this provider's assets (under the build's own ``env_overrides``)
    gdal: dict[str, str] = field(default_factory=dict)
    #: modality -> extra GDAL options for that modality's assets (e.g. requester pays)
    modality_gdal: dict[str, dict[str, str]] = field(default_factory=dict)

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

    def gdal_options(self, modality: str) -> dict[str, str]:
        """GDAL options for reading ``modality``'s assets: the profile's, then the modality's."""
        return {**self.gdal, **self.modality_gdal.get(modality, {})}

    def to_dict(self) -> dict[str, Any]:
        """The profile as data (the shape of ``pipeline/profiles/*.yaml``): what the scenes
        table records and :func:`provider_from_dict` reads back. Holds no secret: signing is a
        name, and credential-like GDAL options are refused (:func:`provider_from_dict`)."""
        return {
            "name": self.name, "url": self.url, "signing": self.signing,
            "cloud_property": self.cloud_property, "supports_query": self.supports_query,
            "max_page_size": self.max_page_size, "offset_rule": self.offset_rule,
            "gdal": dict(self.gdal),
            "modalities": {
                m: {"collection": c, "assets": dict(self.assets[m]),
                    **({"gdal": dict(self.modality_gdal[m])} if m in self.modality_gdal else {})}
                for m, c in self.collections.items()
            },
            "notes": list(self.notes),
        }

    def sign_item(self, item: dict) -> dict:
        """A copy of the item dict with every asset href signed."""
        out = dict(item)
        out["assets"] = {
            k: {**a, "href": self.sign(a["href"])} for k, a in item.get("assets", {}).items()
        }
        return out


PC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
EARTH_SEARCH_URL = "https://earth-search.aws.element84.com/v1"

#: the built-in profiles, written as data in ``pipeline/profiles/<name>.yaml``
PROFILE_DIR = Path(__file__).parent / "profiles"
PROVIDER_NAMES = ("planetary-computer", "earth-search", "local")

#: ``offset_rule`` values: ``metadata`` (the item's own metadata first, then the baseline, the
#: product id and the date), ``baseline`` (skip the item's raster:bands / provider flags),
#: ``none`` (every scene's DNs carry no offset: an archive harmonised upstream)
OFFSET_RULES = ("metadata", "baseline", "none")
#: the fields of a profile (``pipeline/profiles/*.yaml`` or a config's ``providers:`` entry)
PROFILE_FIELDS = ("name", "base", "url", "signing", "cloud_property", "supports_query",
                  "max_page_size", "offset_rule", "gdal", "modalities", "notes")
_MODALITY_FIELDS = ("collection", "assets", "gdal")
#: GDAL option names that hold credentials: never in a profile (the scenes table records it);
#: give them to the readers' environment instead
_SECRET_GDAL = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SIGNATURE|USERPWD|"
                          r"HEADER|AUTH|BEARER", re.I)


@functools.cache
def builtin_profile(name: str) -> dict[str, Any]:
    """The raw mapping of built-in profile ``name`` (``pipeline/profiles/<name>.yaml``)."""
    import yaml

    path = PROFILE_DIR / f"{name}.yaml"
    if name not in PROVIDER_NAMES or not path.is_file():
        raise ConfigError(f"unknown provider {name!r}: choose one of {', '.join(PROVIDER_NAMES)} "
                          "or define it under the config's 'providers:' section")
    return yaml.safe_load(path.read_text())


def _signer_for(signing: str, where: str) -> Callable[[str], str]:
    if signing in ("none", "", None):
        return _identity
    if signing == "planetary-computer":
        return _pc_sign
    if ":" not in str(signing):
        raise ConfigError(f"{where}.signing: {signing!r} is not 'none', 'planetary-computer' nor "
                          "'package.module:function'")
    try:
        return load_signer(signing)
    except ConfigError as exc:
        raise ConfigError(f"{where}.signing: {exc}") from None


def provider_from_dict(data: Mapping[str, Any], *, where: str | None = None,
                       profiles: Mapping[str, Mapping[str, Any]] | None = None) -> Provider:
    """A :class:`Provider` from its data (a built-in profile's YAML, a config's ``providers:``
    entry, or what a scenes table recorded). ``base: NAME`` starts from another profile (a
    built-in or one of ``profiles``) and overrides its fields; ``modalities`` entries are
    merged per modality. Every problem raises :class:`ConfigError` naming the field to fix
    (``where`` is the path shown, e.g. ``providers.my-stac``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'provider profile'} must be a mapping of profile fields "
                          f"({', '.join(PROFILE_FIELDS)}), got {type(data).__name__}")
    name = str(data.get("name") or "")
    where = where or f"provider profile {name or '?'!r}"
    unknown = sorted(set(data) - set(PROFILE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; the fields are "
                          f"{', '.join(PROFILE_FIELDS)}")
    if data.get("base"):
        base = str(data["base"])
        parent = (profiles or {}).get(base) if base != name else None
        merged = dict(parent if parent is not None else builtin_profile(base))
        merged.pop("base", None)
        mods = {m: dict(v) for m, v in (merged.get("modalities") or {}).items()}
        for m, v in (data.get("modalities") or {}).items():
            mods[m] = {**mods.get(m, {}), **(v or {})}
        merged.update({k: v for k, v in data.items() if k not in ("base", "modalities")})
        merged["modalities"] = mods
        merged.setdefault("name", name or base)
        return provider_from_dict(merged, where=where, profiles=profiles)
    if not name:
        raise ConfigError(f"{where}.name: missing (the profile's name, recorded in the scenes "
                          "table)")
    mods = data.get("modalities")
    if not isinstance(mods, Mapping) or not mods:
        raise ConfigError(f"{where}.modalities: missing; give at least one of "
                          f"{', '.join(MODALITIES)} with its collection and assets")
    collections: dict[str, str] = {}
    assets: dict[str, dict[str, str]] = {}
    modality_gdal: dict[str, dict[str, str]] = {}
    for m, spec in mods.items():
        at = f"{where}.modalities.{m}"
        if m not in MODALITIES:
            raise ConfigError(f"{at}: unknown modality; choose from {', '.join(MODALITIES)}")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{at}: must be a mapping with 'collection' and 'assets'")
        bad = sorted(set(spec) - set(_MODALITY_FIELDS))
        if bad:
            raise ConfigError(f"{at}: unknown field(s) {bad}; the fields are "
                              f"{', '.join(_MODALITY_FIELDS)}")
        if not spec.get("collection"):
            raise ConfigError(f"{at}.collection: missing (the STAC collection id)")
        table = spec.get("assets")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{at}.assets: missing; map every band name "
                              f"({', '.join(BANDS[m])}) to the item's asset key")
        wanted = set(BANDS[m]) | ({"SCL"} if m == S2L2A else set())
        unknown_bands = sorted(set(table) - wanted)
        if unknown_bands:
            raise ConfigError(f"{at}.assets: unknown band name(s) {unknown_bands}; the {m} bands "
                              f"are {', '.join(sorted(wanted))}")
        missing = [b for b in BANDS[m] if not table.get(b)]
        if missing:
            raise ConfigError(f"{at}.assets: band(s) {missing} have no asset key; add "
                              f"'{missing[0]}: <asset key in the items>' for each")
        collections[m] = str(spec["collection"])
        assets[m] = {str(b): str(k) for b, k in table.items() if k}
        if spec.get("gdal"):
            modality_gdal[m] = _gdal_options(spec["gdal"], f"{at}.gdal")
    offset_rule = str(data.get("offset_rule") or "metadata")
    if offset_rule not in OFFSET_RULES:
        raise ConfigError(f"{where}.offset_rule: {offset_rule!r} is not one of "
                          f"{', '.join(OFFSET_RULES)}")
    signing = str(data.get("signing") or "none")
    try:
        max_page = int(data.get("max_page_size") or 1000)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.max_page_size: {data.get('max_page_size')!r} is not an "
                          "integer") from None
    return Provider(
        name=name,
        url=str(data.get("url") or ""),
        collections=collections,
        assets=assets,
        signer_func=_signer_for(signing, where),
        cloud_property=str(data.get("cloud_property") or "eo:cloud_cover"),
        supports_query=bool(data.get("supports_query", True)),
        max_page_size=max_page,
        notes=tuple(str(n) for n in data.get("notes") or ()),
        signing=signing,
        offset_rule=offset_rule,
        gdal=_gdal_options(data.get("gdal") or {}, f"{where}.gdal"),
        modality_gdal=modality_gdal,
    )


def _gdal_options(options: Any, where: str) -> dict[str, str]:
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: must be a mapping of GDAL option -> value")
    out = {}
    for k, v in options.items():
        if _SECRET_GDAL.search(str(k)):
            raise ConfigError(f"{where}.{k}: credentials do not belong in a provider profile "
                              "(the scenes table records it); set them in the environment of "
                              "the machines that read (e.g. AWS_ACCESS_KEY_ID / "
                              "AWS_SECRET_ACCESS_KEY on the Dask workers)")
        if isinstance(v, Mapping | list | tuple):
            raise ConfigError(f"{where}.{k}: GDAL option values are strings or numbers")
        out[str(k)] = str(v)
    return out


def get_provider(name: str, url: str | None = None,
                 profiles: Mapping[str, Mapping[str, Any]] | None = None,
                 need_url: bool = True) -> Provider:
    """The profile ``name``: one of ``profiles`` (a config's ``providers:`` section) or a
    built-in (:data:`PROVIDER_NAMES`), optionally at another ``url``. ``need_url=False``: a
    profile without an API URL is fine (a search of GeoParquet snapshots, a build)."""
    if profiles and name in profiles:
        prov = provider_from_dict({"name": name, **profiles[name]},
                                  where=f"providers.{name}", profiles=profiles)
    else:
        known = ", ".join([*PROVIDER_NAMES, *(profiles or {})])
        if name not in PROVIDER_NAMES:
            raise ConfigError(f"unknown provider {name!r}: choose one of {known}, or define it "
                              "under the config's 'providers:' section")
        prov = provider_from_dict(builtin_profile(name), where=f"pipeline/profiles/{name}.yaml")
    if url:
        prov = dataclasses.replace(prov, url=url)
    if not prov.url and need_url:
        raise ConfigError(
            f"provider {name!r} needs the URL of its STAC API: pass --stac-url (for the "
            "embedded catalog, printed by its serve command) or set search.stac_url"
        )
    return prov


def provider_from_config(cfg) -> Provider:  # type: ignore[no-untyped-def]
    """The provider a :class:`pipeline.config.Config` names (``search.provider``, defined in
    its ``providers:`` section or built in), at ``search.stac_url`` when given. A bare
    :class:`pipeline.config.SearchConfig` works too (built-in profiles only)."""
    search = getattr(cfg, "search", cfg)
    return get_provider(search.provider, search.stac_url, getattr(cfg, "providers", None))


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


def _raster_offset(item: dict, asset_keys: Sequence[str] | None) -> int | None:
    """The DN offset the band assets' ``raster:bands`` declare (``-offset / scale``), or None
    when none declares both. Without ``asset_keys``, the assets scaled like reflectances
    (``scale`` 0.0001) are read (AOT and WVP have their own scales and no offset)."""
    assets = item.get("assets", {})
    keys = list(asset_keys) if asset_keys is not None else list(assets)
    found: set[int] = set()
    for key in keys:
        for rb in (assets.get(key) or {}).get("raster:bands") or ():
            scale, offset = rb.get("scale"), rb.get("offset")
            if scale is None or offset is None or not scale:
                continue
            if asset_keys is None and abs(float(scale) - 1e-4) > 1e-9:
                continue
            found.add(int(round(-float(offset) / float(scale))))
    if len(found) > 1:
        raise ValueError(f"item {item.get('id')!r}: its band assets declare different "
                         f"raster:bands offsets ({sorted(found)} DN)")
    return found.pop() if found else None


def s2_offset_rule(item: dict, rule: str = "metadata",
                   asset_keys: Sequence[str] | None = None) -> tuple[int, str]:
    """``(DN offset, what decided it)`` of a Sentinel-2 item: 1000 when its DNs are
    ``10000 * reflectance + 1000`` (ESA's processing baseline 04.00 and later), 0 when they are
    ``10000 * reflectance``. The one place that decides it; the rule is recorded per scene
    (the scenes table's ``offset_rule``).

    ``rule="metadata"`` (the default of every built-in profile) asks, in turn:

    1. ``earthsearch:boa_offset_applied: true``: Earth Search says the offset is already
       removed from the pixels: 0. Its items still declare ``raster:bands`` offset -0.1
       (recorded real item ``S2A_39QTA_20230628_0_L2A``), which would undo that a second time;
       this flag wins (see rslearn#501: the sentinel-cogs L2A are harmonised).
    2. ``raster:bands`` ``offset`` and ``scale`` on the band assets (``asset_keys``):
       ``-offset / scale`` (offset -0.1, scale 0.0001: 1000; offset 0: 0).
    3. ``s2:processing_baseline``: 1000 from 04.00 on (``'04.00'``, ``'05.09'``, ESA's
       reprocessing marker ``'99.99'``), else 0.
    4. the product id's ``_Nxxyy_`` part (``s2:product_uri``, else the item id).
    5. the acquisition date: baseline 04.00 started on 2022-01-25.

    ``rule="baseline"`` skips 1-2 (a catalog whose raster:bands cannot be trusted);
    ``rule="none"`` says 0 for every scene (an archive harmonised upstream). Items that are
    not Sentinel-2 get ``(0, "not Sentinel-2")``.
    """
    from .layout import S2_BASELINE_OFFSET, S2_OFFSET_BASELINE

    if rule not in OFFSET_RULES:
        raise ValueError(f"offset rule {rule!r} is not one of {', '.join(OFFSET_RULES)}")
    if rule == "none":
        return 0, "none (profile: harmonised archive)"
    props = item.get("properties", {})
    if rule == "metadata":
        if props.get("earthsearch:boa_offset_applied") is True:
            return 0, "earthsearch:boa_offset_applied"
        declared = _raster_offset(item, asset_keys)
        if declared is not None:
            return declared, "raster:bands"
    b = processing_baseline(item)
    how = "s2:processing_baseline"
    if b is None:
        pid = str(props.get("s2:product_uri") or item.get("id", ""))
        m = re.search(r"_N(\d{2})(\d{2})_", pid)
        if m:
            b, how = f"{m.group(1)}.{m.group(2)}", "product id"
        elif not (str(item.get("collection", "")).startswith("sentinel-2")
                  or str(item.get("id", "")).startswith("S2")):
            return 0, "not Sentinel-2"
        else:
            when = str(props.get("datetime") or "")
            return (S2_BASELINE_OFFSET if when >= "2022-01-25" else 0), "datetime"
    try:
        major, minor = (int(x) for x in b.split(".")[:2])
    except ValueError:
        raise ValueError(f"item {item.get('id')!r}: unreadable s2:processing_baseline {b!r}") from None
    ref = tuple(int(x) for x in S2_OFFSET_BASELINE.split("."))
    return (S2_BASELINE_OFFSET if (major, minor) >= ref else 0), how


def s2_offset(item: dict, rule: str = "metadata",
              asset_keys: Sequence[str] | None = None) -> int:
    """The DN offset of :func:`s2_offset_rule` alone."""
    return s2_offset_rule(item, rule, asset_keys)[0]
