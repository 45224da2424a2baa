"""Deterministic synthetic Sentinel-2 L2A and Sentinel-1 RTC scenes over the demo cities.

Not noise: each city gets a procedural *landscape* defined in city-local metres (east/north of
the city centre), so the same ground appears in every scene and in both UTM zones that cover a
city on a zone boundary (Halle). The landscape has ten land-cover classes named as EuroSAT names
them (:data:`LANDCOVER_CLASSES`):

* fields: a rotated, brick-like parcel pattern; each parcel is annual crop, pasture,
  herbaceous vegetation or permanent crop, and each crop parcel has its own phenology (sowing
  and harvest at a parcel-specific day of year), so multi-season stacks carry real signal;
* forest blobs (deciduous in temperate biomes, evergreen elsewhere), lakes, a meandering river,
  a sea coast for the coastal city;
* a town (residential with gardens, industrial outskirts) with highways through it.

Spectra are L2A reflectances derived from the EuroSAT-MS class means (see
``../shared/data/real/eurosat_ms_1pct/SOURCES.md``; EuroSAT is L1C, so a per-band path-radiance
term was removed), mixed between a dormant and a green end-member by a per-pixel greenness.
Sentinel-1 backscatter is linear gamma0 per class (dB tables below) modulated by greenness,
moisture and orbit direction, with multiplicative gamma speckle (ENL 4.4).

Per acquisition: clouds (SCL 8/9), thin cirrus (10) and cloud shadows (3) from smooth random
fields with a target cover, visible in SCL and in the pixels; ``eo:cloud_cover`` is computed
from the written SCL. Scenes sensed on/after 2022-01-25 carry processing baseline 04.00 and
the +1000 DN offset (BOA_ADD_OFFSET); earlier ones are baseline 03.01 without it. Some scenes
have a swath edge (nodata: 0 for S2, -32768 for S1).

The per-pixel land-cover class of any grid is available through :func:`landcover`; the
catalog builder also writes it as ``labels/<tile>.tif`` next to the items.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from pyproj import Transformer
from shapely.geometry import Polygon, box

from .cities import DEMO_CITIES, DEMO_YEAR, DemoCity
from .cog import write_cog
from .stacmeta import (
    S1_COLLECTION,
    S2_COLLECTION,
    asset_path,
    mgrs_tile,
    s1_item,
    s2_item,
    s2_item_id,
)

#: Half the side of the square each synthetic scene covers around its city, metres, for the
#: ``demo`` profile: 11.52 km squares (1152 px at 10 m), so the demo preset's locations (offsets
#: clipped to 4 km, plus the 1.32 km half patch) lie inside. Multiple of 60 m so the 10/20/60 m
#: grids share their origin, as in real Sentinel-2 tiles.
SCENE_HALF_WIDTH_M = 5760
#: The same for the small ``test`` profile (7.68 km squares, 768 px at 10 m).
TEST_SCENE_HALF_WIDTH_M = 3840

#: Processing baseline 04.00 start (ESA): from this date L2A DN carry BOA_ADD_OFFSET = -1000.
BASELINE_0400_START = datetime(2022, 1, 25, tzinfo=UTC)
BASELINE_OFFSET = 1000

#: Land-cover classes (EuroSAT names and order), the values of :func:`landcover`.
LANDCOVER_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)
CROP, FOREST, HERB, HIGHWAY, INDUSTRIAL, PASTURE, PERMCROP, RESIDENTIAL, RIVER, SEALAKE = range(10)

S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
_B10M = ("B02", "B03", "B04", "B08")
_B20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
_B60M = ("B01", "B09")
_IDX = {b: i for i, b in enumerate(S2_BANDS)}

# Reflectance x 10000 per class: dormant (g=0) and green (g=1) end-members, bands as S2_BANDS.
# Derived from EuroSAT-MS class means (L1C) minus a path-radiance term
# (B01 900, B02 600, B03 400, B04 250, B05 200, B06 120, B07 100, B08 80, B8A 70, B11 20, B12 10)
# and split into a bare/dry and a peak-green spectrum for the vegetated classes.
_SPEC_LO = np.array([
    # B01  B02   B03   B04   B05   B06   B07   B08   B8A   B09   B11   B12
    [600, 900, 1250, 1600, 1900, 2100, 2250, 2350, 2450, 900, 3300, 2700],  # AnnualCrop (soil)
    [350, 450, 600, 650, 900, 1300, 1500, 1600, 1700, 700, 2000, 1200],  # Forest (leaf-off)
    [550, 850, 1150, 1450, 1750, 2100, 2300, 2400, 2550, 950, 3000, 2300],  # Herbaceous (dry)
    [700, 900, 1050, 1100, 1250, 1500, 1650, 1700, 1800, 750, 2000, 1600],  # Highway
    [900, 1150, 1300, 1400, 1550, 1750, 1850, 1900, 1950, 600, 2200, 1900],  # Industrial
    [500, 800, 1100, 1400, 1750, 2200, 2450, 2550, 2700, 950, 3000, 2300],  # Pasture (dry)
    [550, 800, 1100, 1350, 1650, 2100, 2350, 2450, 2600, 850, 2900, 2200],  # PermanentCrop
    [850, 1100, 1250, 1350, 1500, 1750, 1850, 1900, 1950, 600, 2250, 1900],  # Residential roofs
    [400, 550, 700, 550, 500, 400, 380, 350, 330, 150, 150, 100],  # River
    [350, 450, 550, 300, 250, 180, 160, 150, 130, 80, 60, 40],  # SeaLake
], dtype=np.float32)
_SPEC_HI = np.array([
    [250, 350, 650, 350, 1000, 2900, 3700, 4100, 4300, 1300, 2100, 1050],  # AnnualCrop (peak)
    [200, 230, 310, 180, 575, 2080, 2720, 2680, 3070, 860, 1340, 550],  # Forest (EuroSAT)
    [450, 600, 850, 800, 1250, 2100, 2450, 2500, 2650, 1000, 2400, 1500],  # Herbaceous
    [700, 900, 1050, 1100, 1250, 1500, 1650, 1700, 1800, 750, 2000, 1600],  # Highway
    [900, 1150, 1300, 1400, 1550, 1750, 1850, 1900, 1950, 600, 2200, 1900],  # Industrial
    [300, 420, 750, 450, 1150, 3000, 3700, 3900, 4100, 1250, 2200, 1150],  # Pasture (green)
    [450, 650, 900, 1000, 1400, 2500, 2900, 3000, 3200, 900, 2600, 1700],  # PermanentCrop
    [300, 400, 700, 450, 1100, 2700, 3300, 3500, 3700, 1100, 2200, 1200],  # Residential gardens
    [400, 550, 700, 550, 500, 400, 380, 350, 330, 150, 150, 100],  # River
    [350, 450, 550, 300, 250, 180, 160, 150, 130, 80, 60, 40],  # SeaLake
], dtype=np.float32)
_CLOUD_SPEC = np.array(
    [5600, 5400, 5300, 5300, 5400, 5500, 5600, 5600, 5600, 3600, 4300, 3300], dtype=np.float32
)
# Sentinel-1 backscatter (dB): VV dormant/green, VH dormant/green.
_S1_DB = np.array([
    [-14.0, -10.0, -22.0, -16.0],  # AnnualCrop
    [-8.5, -7.0, -15.0, -12.5],  # Forest
    [-13.0, -11.0, -21.0, -17.5],  # Herbaceous
    [-11.0, -11.0, -19.0, -19.0],  # Highway
    [-2.5, -2.5, -10.0, -10.0],  # Industrial (double bounce)
    [-13.0, -10.5, -21.0, -16.5],  # Pasture
    [-11.0, -9.0, -18.0, -15.0],  # PermanentCrop
    [-5.5, -6.5, -13.0, -13.5],  # Residential
    [-19.0, -19.0, -26.0, -26.0],  # River
    [-21.0, -21.0, -28.0, -28.0],  # SeaLake
], dtype=np.float32)
_VEGETATED = np.zeros(10, dtype=bool)
_VEGETATED[[CROP, FOREST, HERB, PASTURE, PERMCROP, RESIDENTIAL]] = True
_WATER = np.zeros(10, dtype=bool)
_WATER[[RIVER, SEALAKE]] = True


@dataclass(frozen=True)
class Biome:
    """Land-cover mix and phenology of a city's surroundings."""

    parcel_probs: tuple[float, float, float, float]  # AnnualCrop, Pasture, Herb, PermanentCrop
    forest_frac: float
    town_radius_m: float
    river_width_m: float
    lake_frac: float
    peak_doy: tuple[int, ...]  # green peaks of natural vegetation (one or two rainy seasons)
    amplitude: float  # seasonal amplitude of natural vegetation greenness
    crop_peaks: tuple[int, ...]  # day-of-year peaks of the crop types
    evergreen: bool
    sea: bool = False


BIOMES: dict[str, Biome] = {
    "temperate-cropland": Biome((0.70, 0.15, 0.08, 0.07), 0.15, 2800, 60, 0.01,
                                (190,), 0.8, (140, 195, 235), False),
    "semi-arid-urban": Biome((0.55, 0.05, 0.35, 0.05), 0.04, 4200, 120, 0.005,
                             (250,), 0.7, (50, 255), True),
    "savanna": Biome((0.25, 0.25, 0.45, 0.05), 0.08, 3200, 30, 0.01,
                     (120, 320), 0.7, (130, 330), True),
    "tropical-forest": Biome((0.20, 0.45, 0.20, 0.15), 0.35, 4000, 50, 0.03,
                             (30,), 0.35, (15, 60, 300), True),
    "coastal": Biome((0.15, 0.30, 0.40, 0.15), 0.30, 3500, 80, 0.0,
                     (300,), 0.4, (280, 330), True, sea=True),
}


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(_stable_seed(*parts))


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


# ------------------------------------------------------------------------------- noise lattices
class _Lattice:
    """Smooth random field: values on a square lattice, smoothstep-bilinear in between."""

    def __init__(self, rng: np.random.Generator, origin: float | tuple[float, float],
                 extent: float, spacing: float):
        """``origin``: the lattice's lower corner, one number for both axes or (x0, y0);
        ``extent``: the side it covers from there."""
        n = int(math.ceil(extent / spacing)) + 3
        self.v = rng.standard_normal((n, n)).astype(np.float32)
        self.origin = (origin, origin) if np.isscalar(origin) else tuple(origin)
        self.spacing = spacing

    def _axis(self, c: np.ndarray, origin: float) -> tuple[np.ndarray, np.ndarray]:
        f = (c - origin) / self.spacing
        f = np.clip(f, 0, self.v.shape[0] - 2.0001)
        i = np.floor(f).astype(np.int32)
        t = (f - i).astype(np.float32)
        return i, t * t * (3 - 2 * t)

    def points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ix, tx = self._axis(x, self.origin[0])
        iy, ty = self._axis(y, self.origin[1])
        v = self.v
        a = v[iy, ix] * (1 - tx) + v[iy, ix + 1] * tx
        b = v[iy + 1, ix] * (1 - tx) + v[iy + 1, ix + 1] * tx
        return a * (1 - ty) + b * ty

    def grid(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Values on the grid x (cols) by y (rows), separably (cheap)."""
        ix, tx = self._axis(x, self.origin[0])
        iy, ty = self._axis(y, self.origin[1])
        v = self.v
        rows0 = v[iy][:, ix] * (1 - tx) + v[iy][:, ix + 1] * tx
        rows1 = v[iy + 1][:, ix] * (1 - tx) + v[iy + 1][:, ix + 1] * tx
        return rows0 * (1 - ty)[:, None] + rows1 * ty[:, None]


class _Fractal:
    """Sum of lattices at halving spacings (octaves)."""

    def __init__(self, rng: np.random.Generator, origin: float | tuple[float, float],
                 extent: float, spacing: float, octaves: int = 3, gain: float = 0.5):
        self.layers = [
            (_Lattice(rng, origin, extent, spacing / 2**k), gain**k) for k in range(octaves)
        ]

    def points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return sum(w * lat.points(x, y) for lat, w in self.layers)

    def grid(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return sum(w * lat.grid(x, y) for lat, w in self.layers)


# --------------------------------------------------------------------------------- landscape
@dataclass
class Landscape:
    """One city's ground truth, in metres east/north of the city centre."""

    city: DemoCity
    seed: int
    extent: float = 12_000.0  # covers +-extent metres (larger than any profile's scene)
    biome: Biome = field(init=False)

    def __post_init__(self) -> None:
        self.biome = BIOMES[self.city.biome]
        rng = _rng("landscape", self.seed, self.city.name)
        ext = self.extent
        o, w = -ext - 2000.0, 2 * ext + 4000.0
        self.forest_noise = _Fractal(rng, o, w, 1400.0, 3)
        self.lake_noise = _Fractal(rng, o, w, 900.0, 2)
        self.town_noise = _Lattice(rng, o, w, 1500.0)
        self.industry_noise = _Fractal(rng, o, w, 500.0, 2)
        self.garden_noise = _Fractal(rng, o, w, 40.0, 2)
        self.texture = _Fractal(rng, o, w, 120.0, 3)
        self.coast_noise = _Lattice(rng, o, w, 1200.0)
        # parcels: rotated brick pattern
        self.theta = float(rng.uniform(0, math.pi / 2))
        span = 2 * ext * 1.5
        heights = rng.uniform(120, 420, size=int(span / 120) + 2)
        self.row_bounds = -span / 2 + np.cumsum(heights)
        n_rows = len(self.row_bounds) + 1
        k = int(span / 150) + 2
        widths = rng.uniform(150, 520, size=(n_rows, k))
        self.col_bounds = -span / 2 + np.cumsum(widths, axis=1)
        self.n_cols = k + 1
        n_parcels = n_rows * self.n_cols
        probs = np.array(self.biome.parcel_probs, dtype=np.float64)
        kinds = rng.choice([CROP, PASTURE, HERB, PERMCROP], size=n_parcels, p=probs / probs.sum())
        self.parcel_class = kinds.astype(np.uint8)
        self.parcel_peak = rng.choice(self.biome.crop_peaks, size=n_parcels).astype(np.float32)
        self.parcel_peak += rng.uniform(-12, 12, size=n_parcels).astype(np.float32)
        self.parcel_width = rng.uniform(32, 55, size=n_parcels).astype(np.float32)
        self.parcel_gain = rng.uniform(0.75, 1.0, size=n_parcels).astype(np.float32)
        self.parcel_bright = rng.uniform(0.85, 1.15, size=n_parcels).astype(np.float32)
        # roads through the town, a ring road, a river
        self.roads = [(float(rng.uniform(-800, 800)), float(rng.uniform(-800, 800)),
                       float(rng.uniform(0, math.pi))) for _ in range(3)]
        self.ring_r = self.biome.town_radius_m * float(rng.uniform(1.05, 1.25))
        self.river = {
            "angle": float(rng.uniform(0, math.pi)),
            "offset": float(rng.uniform(-1500, 1500)),
            "a1": float(rng.uniform(300, 700)), "l1": float(rng.uniform(3000, 6000)),
            "p1": float(rng.uniform(0, 2 * math.pi)),
            "a2": float(rng.uniform(80, 200)), "l2": float(rng.uniform(700, 1500)),
            "p2": float(rng.uniform(0, 2 * math.pi)),
        }
        self.coast_angle = float(rng.uniform(-0.4, 0.4))  # sea to the east
        self.coast_dist = float(rng.uniform(2200, 3200))
        # thresholds from the empirical distribution of the noises
        sx = rng.uniform(-ext, ext, 20000)
        sy = rng.uniform(-ext, ext, 20000)
        self.forest_thr = float(np.quantile(self.forest_noise.points(sx, sy),
                                            1 - self.biome.forest_frac))
        self.lake_thr = float(np.quantile(self.lake_noise.points(sx, sy),
                                          1 - max(self.biome.lake_frac, 1e-4)))
        self.industry_thr = float(np.quantile(self.industry_noise.points(sx, sy), 0.75))

    def sample(self, e: np.ndarray, n: np.ndarray) -> dict[str, np.ndarray]:
        """Land cover, parcel id, garden fraction and texture at points (e, n) metres."""
        b = self.biome
        ct, st = math.cos(self.theta), math.sin(self.theta)
        u = e * ct + n * st
        v = -e * st + n * ct
        row = np.searchsorted(self.row_bounds, v).astype(np.int64)
        span = 3 * self.extent * 4
        flat = (self.col_bounds + (np.arange(self.col_bounds.shape[0])[:, None] * span)).ravel()
        row_c = np.minimum(row, self.col_bounds.shape[0] - 1)
        col = np.searchsorted(flat, u + row_c * span) - row_c * self.col_bounds.shape[1]
        pid = (row * self.n_cols + np.clip(col, 0, self.n_cols - 1)).astype(np.int32)
        lc = self.parcel_class[pid].copy()

        forest = self.forest_noise.points(e, n) > self.forest_thr
        lc[forest] = FOREST
        if b.lake_frac > 0:
            lake = self.lake_noise.points(e, n) > self.lake_thr
            lc[lake] = SEALAKE
        r = np.hypot(e, n)
        town = r < b.town_radius_m * (1 + 0.3 * self.town_noise.points(e, n))
        ind = town & (r > 0.45 * b.town_radius_m) & (
            self.industry_noise.points(e, n) > self.industry_thr)
        lc[town] = RESIDENTIAL
        lc[ind] = INDUSTRIAL
        road = np.abs(r - self.ring_r) < 14
        for x0, y0, a in self.roads:
            road |= np.abs((e - x0) * math.sin(a) - (n - y0) * math.cos(a)) < 14
        lc[road] = HIGHWAY
        rv = self.river
        ca, sa = math.cos(rv["angle"]), math.sin(rv["angle"])
        along = e * ca + n * sa
        cross = -e * sa + n * ca
        centre = (rv["offset"] + rv["a1"] * np.sin(2 * np.pi * along / rv["l1"] + rv["p1"])
                  + rv["a2"] * np.sin(2 * np.pi * along / rv["l2"] + rv["p2"]))
        lc[np.abs(cross - centre) < b.river_width_m / 2] = RIVER
        if b.sea:
            coast = e * math.cos(self.coast_angle) + n * math.sin(self.coast_angle)
            lc[coast > self.coast_dist + 500 * self.coast_noise.points(e, n)] = SEALAKE
        garden = np.clip(0.45 + 0.35 * self.garden_noise.points(e, n), 0, 1).astype(np.float32)
        tex = self.texture.points(e, n).astype(np.float32)
        return {"lc": lc, "pid": pid, "garden": garden, "tex": tex}

    # ------------------------------------------------------------------------- phenology
    def natural_season(self, doy: float) -> float:
        """0..1 seasonal greenness of natural vegetation on day-of-year ``doy``."""
        vals = [0.5 + 0.5 * math.cos(2 * math.pi * (doy - p) / 365.25) for p in self.biome.peak_doy]
        return max(vals) ** 1.5

    def greenness(self, lc: np.ndarray, pid: np.ndarray, garden: np.ndarray,
                  doy: float) -> np.ndarray:
        """Per-pixel greenness g in 0..1 on day-of-year ``doy``."""
        b = self.biome
        s = self.natural_season(doy)
        d = np.abs(((doy - self.parcel_peak) + 182.6) % 365.25 - 182.6)
        crop_g = 0.05 + 0.95 * self.parcel_gain * np.exp(-0.5 * (d / self.parcel_width) ** 2)
        by_class = np.zeros(10, dtype=np.float32)
        by_class[FOREST] = (0.85 + 0.1 * s) if b.evergreen else (0.12 + 0.88 * s ** 0.6)
        by_class[HERB] = 0.25 + b.amplitude * 0.6 * s
        by_class[PASTURE] = 0.4 + b.amplitude * 0.55 * s
        by_class[PERMCROP] = 0.3 + b.amplitude * 0.6 * s
        g = by_class[lc]
        is_crop = lc == CROP
        g[is_crop] = crop_g[pid[is_crop]]
        var = (lc == PASTURE) | (lc == HERB) | (lc == PERMCROP)
        g[var] *= self.parcel_gain[pid[var]]
        res = lc == RESIDENTIAL
        g[res] = garden[res] * (0.5 + 0.5 * s)
        return np.clip(g, 0, 1)


@lru_cache(maxsize=16)
def get_landscape(city_name: str, seed: int) -> Landscape:
    city = next(c for c in DEMO_CITIES if c.name == city_name)
    return Landscape(city, seed)


# ------------------------------------------------------------------------------- tile grids
@dataclass(frozen=True)
class Tile:
    """One synthetic scene footprint: a city in one UTM zone."""

    city: DemoCity
    epsg: int
    half_width_m: int

    @property
    def name(self) -> str:
        return f"{slug(self.city.name)}_{self.epsg}"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        tr = Transformer.from_crs(4326, self.epsg, always_xy=True)
        x, y = tr.transform(self.city.lon, self.city.lat)
        x0 = round((x - self.half_width_m) / 60.0) * 60.0
        y1 = round((y + self.half_width_m) / 60.0) * 60.0
        w = 2.0 * self.half_width_m
        return (x0, y1 - w, x0 + w, y1)

    def grid(self, res: int) -> tuple[Affine, tuple[int, int]]:
        xmin, ymin, xmax, ymax = self.bounds
        n = int(round((xmax - xmin) / res))
        return Affine(float(res), 0.0, xmin, 0.0, -float(res), ymax), (n, n)

    @property
    def mgrs(self) -> str:
        xmin, ymin, xmax, ymax = self.bounds
        return mgrs_tile(self.epsg, (xmin + xmax) / 2, (ymin + ymax) / 2, self.city.lat)


def utm_epsg(lon: float, lat: float) -> int:
    zone = int((lon + 180) // 6) + 1
    return (32600 if lat >= 0 else 32700) + zone


def city_tiles(city: DemoCity, half_width_m: int) -> list[Tile]:
    """The tiles covering ``city``: its UTM zone, plus the neighbour zone when the footprint
    crosses a zone boundary (so a city on the boundary appears in both CRSs)."""
    km_per_deg = 111.32 * math.cos(math.radians(city.lat))
    dlon = half_width_m / 1000.0 / km_per_deg
    epsgs = sorted({utm_epsg(city.lon - dlon, city.lat), utm_epsg(city.lon, city.lat),
                    utm_epsg(city.lon + dlon, city.lat)})
    return [Tile(city, e, half_width_m) for e in epsgs]


def grid_points(transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = shape
    xs = transform.c + transform.a * (np.arange(cols) + 0.5)
    ys = transform.f + transform.e * (np.arange(rows) + 0.5)
    return xs, ys


def _local_coords(city: DemoCity, epsg: int, transform: Affine,
                  shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """City-local metres (east, north) of every pixel centre of a UTM grid."""
    xs, ys = grid_points(transform, shape)
    xx, yy = np.meshgrid(xs, ys)
    tr = Transformer.from_crs(epsg, 4326, always_xy=True)
    lon, lat = tr.transform(xx.ravel(), yy.ravel())
    lon = np.asarray(lon).reshape(shape)
    lat = np.asarray(lat).reshape(shape)
    e = (lon - city.lon) * (111_320.0 * math.cos(math.radians(city.lat)))
    n = (lat - city.lat) * 110_574.0
    return e, n


def landcover(city: DemoCity | str, epsg: int, bounds: tuple[float, float, float, float],
              resolution: float = 10.0, seed: int = 0) -> np.ndarray:
    """The per-pixel land-cover class (index into :data:`LANDCOVER_CLASSES`, uint8) of the
    synthetic landscape around ``city`` on the grid ``bounds`` (xmin, ymin, xmax, ymax in
    EPSG ``epsg``) at ``resolution`` metres. The same ground the scenes of that seed show."""
    name = city if isinstance(city, str) else city.name
    land = get_landscape(name, seed)
    xmin, ymin, xmax, ymax = bounds
    shape = (int(round((ymax - ymin) / resolution)), int(round((xmax - xmin) / resolution)))
    transform = Affine(resolution, 0.0, xmin, 0.0, -resolution, ymax)
    e, n = _local_coords(land.city, epsg, transform, shape)
    return land.sample(e.ravel(), n.ravel())["lc"].reshape(shape)


# ---------------------------------------------------------------------------- acquisitions
def season_windows(year: int = DEMO_YEAR) -> list[tuple[str, datetime, datetime]]:
    """The four calendar seasons of ``year``: DJF (from December of the year before), MAM,
    JJA, SON, as (name, start, end) with ``end`` exclusive."""
    def d(y: int, m: int) -> datetime:
        return datetime(y, m, 1, tzinfo=UTC)
    return [("DJF", d(year - 1, 12), d(year, 3)), ("MAM", d(year, 3), d(year, 6)),
            ("JJA", d(year, 6), d(year, 9)), ("SON", d(year, 9), d(year, 12))]


@dataclass(frozen=True)
class Acquisition:
    modality: str  # "S2" or "S1"
    when: datetime
    season: int
    index: int  # acquisition index within (tile, modality)
    cloud_target: float = 0.0
    cirrus: bool = False
    swath_edge: bool = False
    orbit_state: str = "descending"


def plan_acquisitions(tile: Tile, seed: int, s2_per_season: int,
                      s1_per_season: int) -> list[Acquisition]:
    """Acquisition dates, cloud targets and swath edges of one tile (deterministic)."""
    rng = _rng("plan", seed, tile.city.name)  # same dates in both zones of a city
    out: list[Acquisition] = []
    # S2 overpass ~10:30 local solar time, S1 ~06:00 (descending) / ~18:00 (ascending)
    s2_hour = 10.5 - tile.city.lon / 15.0
    s1_hours = {"descending": 6.0 - tile.city.lon / 15.0, "ascending": 18.0 - tile.city.lon / 15.0}
    i2 = i1 = 0
    for si, (_, start, end) in enumerate(season_windows()):
        days = (end - start).days
        targets = _cloud_targets(rng, s2_per_season)
        for k in range(s2_per_season):
            day = (k + 0.5) * days / s2_per_season + rng.uniform(-6, 6)
            when = _at_hour(start + timedelta(days=float(np.clip(day, 0, days - 1))), s2_hour)
            out.append(Acquisition("S2", when, si, i2, cloud_target=targets[k],
                                   cirrus=bool(rng.random() < 0.35),
                                   swath_edge=bool(rng.random() < 0.2)))
            i2 += 1
        for k in range(s1_per_season):
            state = "descending" if (k + si) % 2 == 0 else "ascending"
            day = (k + 0.5) * days / s1_per_season + rng.uniform(-5, 5)
            when = _at_hour(start + timedelta(days=float(np.clip(day, 0, days - 1))),
                            s1_hours[state])
            out.append(Acquisition("S1", when, si, i1, orbit_state=state,
                                   swath_edge=bool(rng.random() < 0.25)))
            i1 += 1
    return out


def _cloud_targets(rng: np.random.Generator, k: int) -> list[float]:
    """Cloud-cover targets of the k acquisitions of one season: at least one clear (< 10 %)
    and, when k >= 2, one cloudy (> 35 %)."""
    pool = [float(rng.uniform(0.0, 0.08)), float(rng.uniform(0.45, 0.9)),
            float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.0, 0.6))]
    vals = [pool[i % len(pool)] for i in range(k)]
    vals = [0.0 if v < 0.02 else v for v in vals]
    rng.shuffle(vals)
    return vals


def _at_hour(day: datetime, hour: float) -> datetime:
    base = day.replace(hour=0, minute=0, second=0, microsecond=0)
    t = base + timedelta(hours=hour % 24)
    ms = int(_stable_seed(day.isoformat()) % 1000) * 1000
    return t.replace(microsecond=ms)


def baseline_for(when: datetime) -> str:
    """Processing baseline of a synthetic L2A scene: 04.00 from 2022-01-25, else 03.01."""
    return "04.00" if when >= BASELINE_0400_START else "03.01"


def baseline_has_offset(baseline: str) -> bool:
    return baseline >= "04.00"


# ------------------------------------------------------------------------------- rendering
@dataclass
class _Static:
    lc: np.ndarray
    pid: np.ndarray
    garden: np.ndarray
    tex: np.ndarray


def _static(land: Landscape, tile: Tile, res: int) -> _Static:
    transform, shape = tile.grid(res)
    e, n = _local_coords(tile.city, tile.epsg, transform, shape)
    s = land.sample(e.ravel(), n.ravel())
    return _Static(*(s[k].reshape(shape) for k in ("lc", "pid", "garden", "tex")))


def _reflectance(st: _Static, g: np.ndarray, bands: tuple[str, ...], land: Landscape
                 ) -> np.ndarray:
    """(len(bands), rows, cols) float32 surface reflectance x 10000 without clouds."""
    out = np.empty((len(bands),) + st.lc.shape, dtype=np.float32)
    bright = land.parcel_bright[st.pid]
    soil_like = ~_WATER[st.lc]
    tex = 1.0 + 0.06 * st.tex
    for i, b in enumerate(bands):
        j = _IDX[b]
        lo = _SPEC_LO[st.lc, j]
        hi = _SPEC_HI[st.lc, j]
        v = lo + g * (hi - lo)
        v = np.where(soil_like, v * np.where(st.lc == CROP, bright, 1.0) * tex, v)
        out[i] = v
    return out


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    r, c = a.shape[-2] // k, a.shape[-1] // k
    return a[..., : r * k, : c * k].reshape(a.shape[:-2] + (r, k, c, k)).mean(axis=(-3, -1))


def _swath(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, Polygon]:
    """A diagonal swath edge: the nodata mask (25-45 % of the tile) and the valid footprint
    as a polygon in pixel coordinates."""
    rows, cols = shape
    ang = rng.uniform(-0.35, 0.35) + (0 if rng.random() < 0.5 else math.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    proj = (xx + 0.5 - cols / 2) * ca + (yy + 0.5 - rows / 2) * sa
    thr = float(np.quantile(proj, 1 - rng.uniform(0.25, 0.45)))
    big = 4.0 * (rows + cols)
    # half-plane proj <= thr as a large polygon: points p with (p - c) . (ca, sa) <= thr
    cx, cy = cols / 2 + thr * ca, rows / 2 + thr * sa
    half = Polygon([
        (cx - sa * big, cy + ca * big), (cx + sa * big, cy - ca * big),
        (cx + sa * big - ca * big, cy - ca * big - sa * big),
        (cx - sa * big - ca * big, cy + ca * big - sa * big),
    ])
    return proj > thr, box(0, 0, cols, rows).intersection(half)


def _to_utm(poly_px: Polygon, transform: Affine) -> Polygon:
    from shapely.affinity import affine_transform

    return affine_transform(poly_px, [transform.a, transform.b, transform.d, transform.e,
                                      transform.c, transform.f])


def _solar(lat: float, when: datetime, lon: float) -> tuple[float, float]:
    """Approximate solar zenith and azimuth (degrees)."""
    doy = when.timetuple().tm_yday
    decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + doy) / 365.0)
    solar_time = when.hour + when.minute / 60 + lon / 15.0
    h = math.radians(15.0 * (solar_time - 12.0))
    phi = math.radians(lat)
    cosz = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(h)
    z = math.acos(max(-1.0, min(1.0, cosz)))
    az = math.atan2(math.sin(h), math.cos(h) * math.sin(phi) - math.tan(decl) * math.cos(phi))
    return math.degrees(z), (math.degrees(az) + 180.0) % 360.0


def _s2_abs_orbit(platform: str, when: datetime) -> int:
    ref = datetime(2022, 1, 1, tzinfo=UTC)
    base = 34000 if platform.endswith("A") else 25100
    return base + int((when - ref).total_seconds() / 86400.0 * 14.3)


def _s1_orbits(when: datetime) -> tuple[int, int]:
    ref = datetime(2024, 4, 19, 4, 58, tzinfo=UTC)  # S1A abs orbit 53498 (a PC item)
    absolute = 53498 + int(math.floor((when - ref).total_seconds() / (12 * 86400 / 175)))
    relative = (absolute - 73) % 175 + 1
    return absolute, relative


def render_tile(tile: Tile, out: Path, seed: int, s2_per_season: int,
                s1_per_season: int) -> list[dict[str, Any]]:
    """Write every S2 and S1 scene (COGs) and the land-cover label of one tile; return the
    STAC items (dicts)."""
    land = get_landscape(tile.city.name, seed)
    st10 = _static(land, tile, 10)
    st20 = _static(land, tile, 20)
    t10, shape10 = tile.grid(10)
    t20, shape20 = tile.grid(20)
    t60, shape60 = tile.grid(60)
    label = out / "labels" / f"{tile.name}.tif"
    write_cog(label, st10.lc, t10, tile.epsg, resampling="nearest")
    items = []
    for acq in plan_acquisitions(tile, seed, s2_per_season, s1_per_season):
        if acq.modality == "S2":
            items.append(_render_s2(tile, land, acq, st10, st20, (t10, shape10), (t20, shape20),
                                    (t60, shape60), out, seed))
        else:
            items.append(_render_s1(tile, land, acq, st10, (t10, shape10), out, seed))
    return items


def _covering(xs: np.ndarray, ys: np.ndarray, margin: float
              ) -> tuple[tuple[float, float], float]:
    """Lattice origin (x0, y0) and side covering the pixel centres ``xs``/``ys`` plus a margin.

    (Eastings and northings each get their own origin: one origin for both made the lattice
    span from the easting to the northing, millions of metres, i.e. ~10^8 random numbers.)
    """
    side = max(float(xs.max() - xs.min()), float(ys.max() - ys.min())) + 2 * margin
    return (float(xs.min()) - margin, float(ys.min()) - margin), side


def _render_s2(tile: Tile, land: Landscape, acq: Acquisition, st10: _Static, st20: _Static,
               g10: tuple[Affine, tuple[int, int]], g20: tuple[Affine, tuple[int, int]],
               g60: tuple[Affine, tuple[int, int]], out: Path, seed: int) -> dict[str, Any]:
    rng = _rng("s2", seed, tile.name, acq.index)
    when = acq.when
    doy = when.timetuple().tm_yday + (when.year - DEMO_YEAR) * 365
    doy = doy % 365.25
    baseline = baseline_for(when)
    offset = BASELINE_OFFSET if baseline_has_offset(baseline) else 0
    platform = "Sentinel-2A" if acq.index % 2 == 0 else "Sentinel-2B"
    generation = when + timedelta(hours=3, minutes=int(rng.integers(0, 180)),
                                  seconds=int(rng.integers(0, 60)))
    generation = generation.replace(microsecond=int(rng.integers(0, 999999)))
    rel_orbit = 1 + _stable_seed("s2orbit", tile.city.name) % 143
    item_id = s2_item_id(platform, when, rel_orbit, tile.mgrs, generation)

    shape20 = g20[1]
    # clouds, cirrus and shadows on the 20 m grid
    xs, ys = grid_points(*g20)
    cf = _Fractal(rng, *_covering(xs, ys, 5000.0), 2500.0, 4, 0.55)
    cloud_field = cf.grid(xs, ys)
    alpha = np.zeros(shape20, dtype=np.float32)
    if acq.cloud_target > 0:
        thr = np.quantile(cloud_field, 1 - acq.cloud_target)
        spread = 0.5 * float(cloud_field.std())
        alpha = np.where(cloud_field > thr,
                         np.clip(0.25 + (cloud_field - thr) / spread, 0, 1), 0).astype(np.float32)
    cirrus = np.zeros(shape20, dtype=bool)
    if acq.cirrus:
        cif = _Lattice(rng, *_covering(xs, ys, 5000.0), 3000.0)
        cirrus_field = cif.grid(xs, ys)
        cirrus = (cirrus_field > np.quantile(cirrus_field, 1 - rng.uniform(0.04, 0.15))) & (
            alpha == 0)
    zen, az = _solar(tile.city.lat, when, tile.city.lon)
    shift_m = 1500.0 * math.tan(math.radians(min(zen, 75)))  # cloud height ~1.5 km
    dx = -int(round(shift_m * math.sin(math.radians(az)) / 20))
    dy = int(round(shift_m * math.cos(math.radians(az)) / 20))
    cloudy = alpha > 0.15
    shadow = np.zeros(shape20, dtype=bool)
    if cloudy.any():
        shifted = np.roll(np.roll(cloudy, dy, axis=0), dx, axis=1)
        shadow = shifted & ~cloudy
    nodata20 = np.zeros(shape20, dtype=bool)
    footprint = box(*tile.bounds)
    if acq.swath_edge:
        nodata20, poly = _swath(rng, shape20)
        footprint = _to_utm(poly, g20[0])

    # SCL
    g20v = land.greenness(st20.lc, st20.pid, st20.garden, doy)
    scl = np.where(_WATER[st20.lc], 6,
                   np.where(_VEGETATED[st20.lc] & (g20v > 0.35), 4, 5)).astype(np.uint8)
    scl[shadow] = 3
    scl[cirrus] = 10
    scl[(alpha > 0) & (alpha < 0.6)] = 8
    scl[alpha >= 0.6] = 9
    scl[nodata20] = 0

    def cloudify(refl: np.ndarray, a: np.ndarray, ci: np.ndarray, sh: np.ndarray,
                 bands: tuple[str, ...]) -> np.ndarray:
        spec = _CLOUD_SPEC[[_IDX[b] for b in bands]][:, None, None]
        refl = refl * (1 - a) + spec * a
        refl = np.where(ci, refl * 0.85 + 700, refl)
        return np.where(sh, refl * 0.4, refl)

    up = np.ones((2, 2), dtype=np.uint8)
    a10 = np.kron(alpha, up.astype(np.float32))
    ci10 = np.kron(cirrus.astype(np.uint8), up).astype(bool)
    sh10 = np.kron(shadow.astype(np.uint8), up).astype(bool)
    nd10 = np.kron(nodata20.astype(np.uint8), up).astype(bool)

    g10v = land.greenness(st10.lc, st10.pid, st10.garden, doy)
    haze = float(rng.uniform(0, 1))
    path = np.array([300, 200, 120, 60, 40, 20, 15, 10, 10, 0, 0, 0], dtype=np.float32) * haze
    refl10 = cloudify(_reflectance(st10, g10v, _B10M, land), a10, ci10, sh10, _B10M)
    refl10 += path[[_IDX[b] for b in _B10M]][:, None, None]
    refl20 = cloudify(_reflectance(st20, g20v, _B20M + _B60M, land), alpha, cirrus, shadow,
                      _B20M + _B60M)
    refl20 += path[[_IDX[b] for b in _B20M + _B60M]][:, None, None]

    def to_dn(refl: np.ndarray, nodata: np.ndarray) -> np.ndarray:
        noisy = refl + rng.normal(0, 12, size=refl.shape).astype(np.float32)
        dn = np.clip(np.rint(noisy) + offset, 1, 65535).astype(np.uint16)
        dn[:, nodata] = 0
        return dn

    dn10 = to_dn(refl10, nd10)
    dn20 = to_dn(refl20[: len(_B20M)], nodata20)
    refl60 = _block_mean(refl20[len(_B20M):], 3)
    nd60 = _block_mean(nodata20.astype(np.float32), 3) > 0.5
    dn60 = to_dn(refl60, nd60)

    asset_dir = lambda key: asset_path(out, S2_COLLECTION, item_id, key)  # noqa: E731
    for i, b in enumerate(_B10M):
        write_cog(asset_dir(b), dn10[i], g10[0], tile.epsg, nodata=0)
    for i, b in enumerate(_B20M):
        write_cog(asset_dir(b), dn20[i], g20[0], tile.epsg, nodata=0)
    for i, b in enumerate(_B60M):
        write_cog(asset_dir(b), dn60[i], g60[0], tile.epsg, nodata=0)
    write_cog(asset_dir("SCL"), scl, g20[0], tile.epsg, nodata=0, resampling="nearest")
    # AOT (x1000) and WVP (cm x 1000) on the 10 m grid
    xs10, ys10 = grid_points(*g10)
    aot_f = _Lattice(rng, *_covering(xs10, ys10, 5000.0), 4000.0)
    aot = np.clip(80 + 150 * haze + 25 * aot_f.grid(xs10, ys10), 1, 1000).astype(np.uint16)
    wv_season = land.natural_season(doy)
    wv_f = _Lattice(rng, *_covering(xs10, ys10, 5000.0), 4000.0)
    wvp = np.clip(900 + 2200 * wv_season + 250 * wv_f.grid(xs10, ys10), 1, 6000
                  ).astype(np.uint16)
    aot[nd10] = 0
    wvp[nd10] = 0
    write_cog(asset_dir("AOT"), aot, g10[0], tile.epsg, nodata=0)
    write_cog(asset_dir("WVP"), wvp, g10[0], tile.epsg, nodata=0)
    # TCI: reflectance 0..0.2 -> 1..255, nodata 0
    tci = np.clip(np.rint((dn10[[2, 1, 0]].astype(np.float32) - offset) * 255.0 / 2000.0),
                  1, 255).astype(np.uint8)
    tci[:, nd10] = 0
    write_cog(asset_dir("visual"), tci, g10[0], tile.epsg, nodata=0)

    rcf = 1.0 / (1 - 0.01672 * math.cos(math.radians(0.9856 * (doy - 4)))) ** 2
    return s2_item(
        item_id=item_id, platform=platform, sensing=when, generation=generation,
        epsg=tile.epsg, mgrs_tile=tile.mgrs, baseline=baseline, relative_orbit=rel_orbit,
        absolute_orbit=_s2_abs_orbit(platform, when), centre="SYNT",
        grids={10: g10, 20: g20, 60: g60}, footprint_utm=footprint, scl=scl,
        solar_zenith=zen, solar_azimuth=az, reflectance_conversion_factor=rcf,
        asset_keys=("AOT", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09",
                    "B11", "B12", "B8A", "SCL", "WVP", "visual"),
        description=(f"Synthetic Sentinel-2 L2A scene over {tile.city.name} "
                     f"(ssl4eo demo catalog, seed {seed}); not real data."),
    )


def _render_s1(tile: Tile, land: Landscape, acq: Acquisition, st10: _Static,
               g10: tuple[Affine, tuple[int, int]], out: Path, seed: int) -> dict[str, Any]:
    rng = _rng("s1", seed, tile.name, acq.index)
    when = acq.when
    doy = when.timetuple().tm_yday % 365.25
    g = land.greenness(st10.lc, st10.pid, st10.garden, doy)
    lc = st10.lc
    moisture = float(rng.uniform(-1.0, 1.0))
    soilish = np.isin(lc, [CROP, HERB, PASTURE, PERMCROP])
    orient = 1.5 if acq.orbit_state == "ascending" else -1.0
    built = (lc == RESIDENTIAL) | (lc == INDUSTRIAL)
    wind = float(rng.uniform(-2.0, 3.0))
    layers = []
    for pol in (0, 1):  # vv, vh
        lo = _S1_DB[lc, 2 * pol]
        hi = _S1_DB[lc, 2 * pol + 1]
        db = lo + g * (hi - lo) + 0.8 * st10.tex
        db = np.where(soilish, db + moisture * (1 - g), db)
        db = np.where(built, db + orient, db)
        db = np.where(_WATER[lc], db + wind, db)
        lin = np.power(10.0, db / 10.0, dtype=np.float32)
        speckle = rng.gamma(4.4, 1 / 4.4, size=lin.shape).astype(np.float32)
        layers.append((lin * speckle).astype(np.float32))
    shape = g10[1]
    nodata = np.zeros(shape, dtype=bool)
    footprint = box(*tile.bounds)
    if acq.swath_edge:
        nodata, poly = _swath(rng, shape)
        footprint = _to_utm(poly, g10[0])
    for arr in layers:
        arr[nodata] = -32768.0

    absolute, relative = _s1_orbits(when)
    # one GRD slice per zone: the second zone of a boundary city is the next slice
    zone_slot = tile.epsg % 2  # neighbouring zones differ in parity, so their ids differ
    start = when - timedelta(seconds=12) + timedelta(seconds=25 * zone_slot)
    end = start + timedelta(seconds=25)
    datatake = (absolute * 7 + 0x1234) % 0xFFFFFF
    grd_id = (f"S1A_IW_GRDH_1SDV_{start:%Y%m%dT%H%M%S}_{end:%Y%m%dT%H%M%S}_{absolute:06d}_"
              f"{datatake:06X}")
    item_id = f"{grd_id}_rtc"
    files = {}
    for key, arr in zip(("vv", "vh"), layers, strict=True):
        p = asset_path(out, S1_COLLECTION, item_id, key)
        write_cog(p, arr, g10[0], tile.epsg, nodata=-32768.0)
        files[key] = p
    return s1_item(
        item_id=item_id, grd_id=grd_id, start=start, end=end, epsg=tile.epsg,
        transform=g10[0], shape=shape, footprint_utm=footprint, orbit_state=acq.orbit_state,
        relative_orbit=relative, absolute_orbit=absolute, datatake_id=datatake,
        slice_number=10 + zone_slot, total_slices=20, timeliness="Fast-24h",
        asset_files=files,
        description=(f"Synthetic Sentinel-1 RTC scene (linear gamma0) over {tile.city.name} "
                     f"(ssl4eo demo catalog, seed {seed}); not real data."),
    )
