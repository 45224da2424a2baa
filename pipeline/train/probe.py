"""Linear probing of a pretrained backbone on frozen features, next to the same backbone with
random weights.

Protocol (what :func:`probe` does, in order):

1. **Data.** Either EuroSAT-MS (13-band 64 x 64 GeoTIFFs in ``train|test/<Class>/*.tif``;
   :func:`load_eurosat` reads *all* images of both splits, since the 1 % subset's test split is
   too small for a stable figure), or, where EuroSAT is absent, a labelled task cut from the
   embedded catalog's synthetic scenes (:func:`synthetic_probe_data`: 64 x 64 patches of the
   clearest Sentinel-2 L2A scenes, each labelled with the majority land-cover class of
   ``labels/<tile>.tif``, the ten EuroSAT classes). The result says which task ran.
2. **Bands.** The backbone's input bands are the band names stored in the weights' metadata
   (a store's ``S2L2A`` has 12 bands, ``B01`` .. ``B12`` without ``B10``); they are picked from
   the data by name (EuroSAT's ``B10`` is dropped). A band the data lacks is filled with zeros
   after normalisation (the band mean) and listed in ``missing_bands``. Without band names, a
   13-band image feeds a 12-channel backbone without ``B10``.
3. **Values.** EuroSAT is Level-1C DN = 10000 x reflectance; the store keeps S2 DN in the
   v1.1 convention (+1000). The difference (``ssl4eo:s2_offset`` in the weights, else 1000)
   is added to the probe data's S2 bands, then each band is standardised with the weights'
   ``norm_mean``/``norm_std`` (the store statistics used in pretraining); without them, with
   the probe data's own per-band mean and std (no labels involved).
4. **Features.** Images are resized (bilinear) to ``image_size`` (default: the pretraining
   crop size from the weights, else 224, as the paper's Resize + CenterCrop(224) does with
   64 px EuroSAT), passed through the frozen backbone in eval mode, and globally average
   pooled: over the last feature map for CNNs, over the patch tokens (after the final norm,
   class token excluded) for ViTs.
5. **Classifier.** Multinomial logistic regression (full-batch L-BFGS, in torch) on features
   standardised with the training fold's mean and std. The L2 strength is chosen per outer
   fold by 3-fold inner cross-validation over :data:`L2_GRID` (or fixed with ``l2=``).
6. **Evaluation.** Stratified k-fold cross-validation (``folds``, seeded) over all images;
   accuracy per fold, reported as mean and standard deviation, for the pretrained backbone
   and for the same architecture with random weights (seeded), on identical inputs and folds.
   Classes with fewer than two images are left out (and named in ``dropped_classes``).

This is a cheaper protocol than the paper's (SGD, lr 8, 100 epochs, augmentation, on the full
EuroSAT), meant to compare representations quickly; figures are not the paper's.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

log = logging.getLogger(__name__)

#: EuroSAT-MS band order in its GeoTIFFs (all bands resampled to 10 m, 64 x 64 px): B8A is
#: the *last* band, not the ninth as often written. What the pixels say (the 1 % subset):
#: the 13th band correlates 0.98 with B08 (B8A, the narrow NIR, does); the 10th has a mean of
#: 12 DN and std 4 (B10, cirrus, is near-black over land); the 9th, 729 DN, is B09 (water
#: vapour). Read in the other order, a backbone got B09 for B8A, cirrus for B09, B12 for B11
#: and NIR for B12, so the probe measured nothing a pretraining had learned about the bands.
EUROSAT_BANDS = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)
#: L2 strengths tried by the inner cross-validation (on standardised features).
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
#: DN offset of the store's S2 convention when the weights do not record it (v1.1: +1000).
DEFAULT_S2_OFFSET = 1000
#: SCL classes that make a pixel unusable for a probe patch (nodata, defective, shadow,
#: clouds, cirrus).
_SCL_BAD = (0, 1, 3, 8, 9, 10)


# ------------------------------------------------------------------------------------ data
@dataclass
class ProbeData:
    """A labelled image set for probing.

    ``images`` are S2 DN (``dn_offset`` + 10000 x reflectance) as float32 ``[N, C, H, W]``,
    ``labels`` index ``classes``; ``origins`` says where each image comes from (a file, or
    ``<tile>:<row>:<col>:<item id>`` for a catalog window of ``patch`` px: rows/cols in
    patches).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    band_names: list[str]
    dn_offset: int
    task: str
    source: str
    notes: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(f"images {self.images.shape} and labels {self.labels.shape} differ")
        if self.images.shape[1] != len(self.band_names):
            raise ValueError(f"{self.images.shape[1]} channels but {len(self.band_names)} names")

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


def default_eurosat_dir() -> Path | None:
    """``eurosat_ms_1pct`` inside the real-data folder (``$SSL4EO_REAL_DATA`` or
    ``../shared/data/real``), or ``None`` when it is absent."""
    from ..demo.cli import default_real_data

    real = default_real_data()
    if real is None:
        return None
    cand = Path(real) / "eurosat_ms_1pct"
    return cand if is_eurosat_dir(cand) else None


def is_eurosat_dir(path: str | Path) -> bool:
    """True for a folder laid out as ``train|test/<Class>/*.tif`` (or ``<Class>/*.tif``)."""
    p = Path(path)
    return p.is_dir() and bool(_eurosat_files(p))


def is_catalog_dir(path: str | Path) -> bool:
    """True for an embedded catalog with land-cover labels (``catalog.json`` + ``labels/``)."""
    p = Path(path)
    return (p / "catalog.json").is_file() and any((p / "labels").glob("*.tif"))


def _eurosat_files(root: Path) -> list[tuple[str, Path]]:
    """(class, file) pairs under ``root/{train,test}/<Class>/`` or ``root/<Class>/``."""
    splits = [root / s for s in ("train", "test", "val") if (root / s).is_dir()] or [root]
    out = []
    for split in splits:
        for cls_dir in sorted(p for p in split.iterdir() if p.is_dir()):
            for f in sorted(cls_dir.glob("*.tif")) + sorted(cls_dir.glob("*.tiff")):
                out.append((cls_dir.name, f))
    return out


def load_eurosat(data_dir: str | Path, *, progress: bool = False) -> ProbeData:
    """All images of a EuroSAT-MS folder (``train|test/<Class>/*.tif``), labels from folders.

    Bands are named from the files' band descriptions when they hold band names, else from
    :data:`EUROSAT_BANDS` (13-band files). Values are Level-1C DN (no offset).
    """
    import rasterio

    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data {str(root)!r} is not a directory; give the EuroSAT-MS folder "
                        "(train|test/<Class>/*.tif) or a demo catalog folder")
    files = _eurosat_files(root)
    if not files:
        raise UserError(f"no GeoTIFFs under {str(root)!r} in train|test/<Class>/*.tif or "
                        "<Class>/*.tif; point --data at the EuroSAT-MS folder")
    classes = sorted({c for c, _ in files})
    images, labels, origins = [], [], []
    names: tuple[str, ...] | None = None
    shape = None
    it: Any = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="reading EuroSAT", unit="img", leave=False)
    for cls, f in it:
        try:
            with rasterio.open(f) as src:
                arr = src.read().astype(np.float32)
                desc = tuple(d or "" for d in src.descriptions)
        except rasterio.errors.RasterioError as exc:
            raise UserError(f"cannot read {str(f)!r} ({exc}); remove or replace the file") from exc
        if shape is None:
            shape = arr.shape
            if all(d.upper().startswith("B") for d in desc) and len(set(desc)) == len(desc):
                names = tuple(d.upper() for d in desc)
            elif arr.shape[0] == len(EUROSAT_BANDS):
                names = EUROSAT_BANDS
            else:
                raise UserError(
                    f"{str(f)!r} has {arr.shape[0]} bands without band names; EuroSAT-MS files "
                    f"have {len(EUROSAT_BANDS)} ({', '.join(EUROSAT_BANDS)})")
        elif arr.shape != shape:
            raise UserError(f"{str(f)!r} has shape {arr.shape}, the other images {shape}; all "
                            "probe images must have the same bands and size")
        images.append(arr)
        labels.append(classes.index(cls))
        origins.append(str(f.relative_to(root)))
    assert names is not None
    return ProbeData(
        images=np.stack(images), labels=np.asarray(labels, dtype=np.int64), classes=classes,
        band_names=list(names), dn_offset=0, task="eurosat-ms", source=str(root),
        origins=origins,
    )


def _s2_items(catalog: Path) -> list[tuple[dict[str, Any], Path]]:
    out = []
    for p in sorted((catalog / "items").glob("sentinel-2-l2a*/*.json")):
        try:
            item = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if item.get("type") == "Feature" and "B02" in item.get("assets", {}):
            out.append((item, p))
    return out


def _item_epsg(item: dict[str, Any]) -> int | None:
    props = item.get("properties", {})
    if props.get("proj:epsg"):
        return int(props["proj:epsg"])
    code = str(props.get("proj:code") or "")
    return int(code.split(":")[1]) if code.upper().startswith("EPSG:") else None


def _asset_path(item_path: Path, item: dict[str, Any], key: str) -> Path:
    href = item["assets"][key]["href"]
    if href.startswith("file://"):
        href = href[7:]
    p = Path(href)
    return p if p.is_absolute() else (item_path.parent / p).resolve()


def _baseline_offset(item: dict[str, Any]) -> int:
    """DN offset a scene carries: +1000 from processing baseline 04.00 on, else 0."""
    from .. import layout

    baseline = str(item.get("properties", {}).get("s2:processing_baseline") or "99.99")
    try:
        newer = tuple(int(v) for v in baseline.split(".")) >= tuple(
            int(v) for v in layout.S2_OFFSET_BASELINE.split("."))
    except ValueError:
        newer = True
    return layout.S2_BASELINE_OFFSET if newer else 0


def _read_on_grid(path: Path, crs: Any, transform: Any, shape: tuple[int, int],
                  resampling: str) -> np.ndarray:
    """Band 1 of ``path`` warped onto the label grid (identity for the 10 m bands)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with rasterio.open(path) as src:
        if src.crs == crs and src.transform == transform and src.shape == shape:
            return src.read(1)
        with WarpedVRT(src, crs=crs, transform=transform, width=shape[1], height=shape[0],
                       resampling=getattr(Resampling, resampling), nodata=src.nodata) as vrt:
            return vrt.read(1)


def synthetic_probe_data(
    catalog_dir: str | Path,
    *,
    patch_size: int = 64,
    max_per_class: int = 60,
    min_purity: float = 0.6,
    max_bad_fraction: float = 0.02,
    scenes_per_tile: int = 4,
    min_per_class: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> ProbeData:
    """A labelled land-cover task from the embedded catalog's synthetic Sentinel-2 scenes.

    For every label raster ``labels/<tile>.tif`` (10 m, classes of
    :data:`pipeline.demo.synthetic.LANDCOVER_CLASSES`), the catalog's S2 L2A items on the same
    grid are read from the least cloudy on (at most ``scenes_per_tile``), all 12 bands warped
    to the 10 m label grid. The grid is cut into non-overlapping ``patch_size`` windows; a
    window is kept when its majority class covers at least ``min_purity`` of it, and takes its
    pixels from the first scene where at most ``max_bad_fraction`` of it is nodata, cloud,
    cirrus or shadow (SCL). Each window is used once, so no location is in two folds. At most
    ``max_per_class`` windows per class are kept (drawn with ``seed``); classes with fewer than
    ``min_per_class`` are dropped. DN are harmonised to the store's v1.1 convention (+1000 for
    scenes before processing baseline 04.00).
    """
    import rasterio

    from .. import layout
    from ..demo.synthetic import LANDCOVER_CLASSES, S2_BANDS

    cat = Path(catalog_dir)
    labels = sorted((cat / "labels").glob("*.tif"))
    if not labels:
        raise UserError(
            f"{str(cat)!r} has no land-cover labels (labels/<tile>.tif); build the embedded "
            "catalog with `ssl4eo catalog build` (or `ssl4eo demo`) and pass its folder")
    items = _s2_items(cat)
    if not items:
        raise UserError(f"{str(cat)!r} has no sentinel-2-l2a items under items/; rebuild it "
                        "with `ssl4eo catalog build`")
    p = patch_size
    windows: list[tuple[np.ndarray, int, str]] = []  # (image [12, p, p], class, origin)
    notes: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(labels), desc="cutting labelled patches", unit="tile", leave=False)
    for lab in labels:
        with rasterio.open(lab) as src:
            lc = src.read(1)
            crs, transform, shape = src.crs, src.transform, src.shape
            bounds = src.bounds
        epsg = crs.to_epsg()
        cands = []
        for item, ipath in items:
            if _item_epsg(item) != epsg:
                continue
            a = item["assets"]["B02"]
            tr, shp = a.get("proj:transform"), a.get("proj:shape")
            if tr and shp:
                x0, y1 = tr[2], tr[5]
                x1, y0 = x0 + tr[0] * shp[1], y1 + tr[4] * shp[0]
                ix = min(x1, bounds.right) - max(x0, bounds.left)
                iy = min(y1, bounds.top) - max(y0, bounds.bottom)
                if ix <= 0 or iy <= 0 or ix * iy < 0.9 * (bounds.right - bounds.left) * (
                        bounds.top - bounds.bottom):
                    continue
            cands.append((float(item["properties"].get("eo:cloud_cover", 100.0)),
                          item["properties"].get("datetime", ""), item, ipath))
        cands.sort(key=lambda c: (c[0], c[1]))
        if not cands:
            notes.append(f"no S2 scene covers {lab.name}")
            if bar is not None:
                bar.update(1)
            continue
        ny, nx = shape[0] // p, shape[1] // p
        todo: dict[tuple[int, int], int] = {}
        for r in range(ny):
            for c in range(nx):
                block = lc[r * p:(r + 1) * p, c * p:(c + 1) * p]
                counts = np.bincount(block.ravel(), minlength=len(LANDCOVER_CLASSES))
                k = int(counts.argmax())
                if counts[k] >= min_purity * block.size and k < len(LANDCOVER_CLASSES):
                    todo[(r, c)] = k
        for _, _, item, ipath in cands[:scenes_per_tile]:
            if not todo:
                break
            scl = _read_on_grid(_asset_path(ipath, item, "SCL"), crs, transform, shape,
                                "nearest")
            bad = np.isin(scl, _SCL_BAD)
            clear = [rc for rc in todo
                     if bad[rc[0] * p:(rc[0] + 1) * p, rc[1] * p:(rc[1] + 1) * p].mean()
                     <= max_bad_fraction]
            if not clear:
                continue
            offset = layout.S2_OFFSET_CONVENTIONS["v1.1"] - _baseline_offset(item)
            cube = np.stack([
                _read_on_grid(_asset_path(ipath, item, b), crs, transform, shape,
                              "bilinear").astype(np.float32)
                for b in S2_BANDS])
            valid = cube > 0
            cube[valid] += offset
            for r, c in clear:
                img = cube[:, r * p:(r + 1) * p, c * p:(c + 1) * p]
                if not valid[:, r * p:(r + 1) * p, c * p:(c + 1) * p].all():
                    continue
                windows.append((img.copy(), todo.pop((r, c)), f"{lab.stem}:{r}:{c}:{item['id']}"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not windows:
        raise UserError(
            f"no clear, single-class {p} x {p} patches found in {str(cat)!r}; lower "
            "--patch-size or use a catalog built with the demo profile")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, k, _) in enumerate(windows):
        by_class.setdefault(k, []).append(i)
    keep: list[int] = []
    used_classes = []
    for k in sorted(by_class):
        idx = by_class[k]
        if len(idx) < min_per_class:
            notes.append(f"class {LANDCOVER_CLASSES[k]} left out ({len(idx)} patches)")
            continue
        if len(idx) > max_per_class:
            idx = sorted(rng.choice(idx, size=max_per_class, replace=False).tolist())
        keep.extend(idx)
        used_classes.append(k)
    if len(used_classes) < 2:
        raise UserError(f"the catalog {str(cat)!r} gives fewer than two classes with "
                        f"{min_per_class}+ patches; lower --patch-size")
    remap = {k: j for j, k in enumerate(used_classes)}
    return ProbeData(
        images=np.stack([windows[i][0] for i in keep]),
        labels=np.asarray([remap[windows[i][1]] for i in keep], dtype=np.int64),
        classes=[LANDCOVER_CLASSES[k] for k in used_classes],
        band_names=list(S2_BANDS), dn_offset=1000, task="synthetic-landcover",
        source=str(cat), notes=notes, origins=[windows[i][2] for i in keep],
    )


def resolve_probe_data(data_dir: str | Path | None = None, catalog_dir: str | Path | None = None,
                       *, seed: int = 0, progress: bool = False) -> ProbeData:
    """The probe task: EuroSAT-MS at ``data_dir`` (a catalog folder there also works), else the
    default EuroSAT-MS folder, else the synthetic land-cover task of ``catalog_dir``."""
    if data_dir is not None:
        if is_catalog_dir(data_dir) and not is_eurosat_dir(data_dir):
            return synthetic_probe_data(data_dir, seed=seed, progress=progress)
        return load_eurosat(data_dir, progress=progress)
    if catalog_dir is None:
        found = default_eurosat_dir()
        if found is not None:
            return load_eurosat(found, progress=progress)
        raise UserError(
            "no probe data: EuroSAT-MS is not at ../shared/data/real/eurosat_ms_1pct (or "
            "$SSL4EO_REAL_DATA/eurosat_ms_1pct); pass --data DIR with EuroSAT-MS "
            "(train|test/<Class>/*.tif) or --catalog DIR with a demo catalog (labels/)")
    data = synthetic_probe_data(catalog_dir, seed=seed, progress=progress)
    data.notes.insert(0, "EuroSAT-MS not found: probing on the synthetic scenes' land cover")
    return data


# ----------------------------------------------------------------------------- inputs
def select_bands(data: ProbeData, want: Sequence[str] | None, in_chans: int
                 ) -> tuple[list[int | None], list[str], list[str]]:
    """Data channel for each backbone input band (``None``: missing), names, missing names."""
    have = [b.upper() for b in data.band_names]
    if want is None:
        if in_chans == len(have):
            want = list(data.band_names)
        elif in_chans == len(have) - 1 and "B10" in have:
            want = [b for b in data.band_names if b.upper() != "B10"]
        elif in_chans == len(have) + 1 and "B10" not in have and len(have) == 12:
            want = list(EUROSAT_BANDS)
        else:
            raise UserError(
                f"the backbone takes {in_chans} channels and its weights name no bands; the "
                f"probe data has {len(have)} ({', '.join(data.band_names)}). Export the "
                "weights with `ssl4eo pretrain` (which records band names) or probe data with "
                "matching bands")
    if len(want) != in_chans:
        raise UserError(f"the weights name {len(want)} bands but the backbone takes {in_chans} "
                        "channels; the weights file is inconsistent, export it again")
    index: list[int | None] = []
    missing = []
    for b in want:
        name = str(b).split(":")[-1].upper()
        if name in have:
            index.append(have.index(name))
        else:
            index.append(None)
            missing.append(str(b))
    if len(missing) == len(want):
        raise UserError(f"none of the backbone's bands ({', '.join(map(str, want))}) is in the "
                        f"probe data ({', '.join(data.band_names)}); probe a matching dataset")
    return index, [str(b) for b in want], missing


def prepare_inputs(data: ProbeData, index: Sequence[int | None], names: Sequence[str],
                   norm: tuple[Sequence[float], Sequence[float]] | None,
                   s2_offset: int) -> tuple[torch.Tensor, str]:
    """Selected, offset-harmonised, standardised images ``[N, C, H, W]`` and the norm source."""
    n, _, h, w = data.images.shape
    x = np.zeros((n, len(index), h, w), dtype=np.float32)
    shift = float(s2_offset - data.dn_offset)
    present = [j for j, i in enumerate(index) if i is not None]
    for j in present:
        band = data.images[:, index[j]]
        x[:, j] = band + (shift if names[j].split(":")[-1].upper().startswith("B") else 0.0)
    if norm is not None:
        mean = np.asarray(norm[0], dtype=np.float32).reshape(-1)
        std = np.asarray(norm[1], dtype=np.float32).reshape(-1)
        if mean.shape != (len(index),) or std.shape != (len(index),):
            raise UserError(f"the weights' norm_mean/norm_std have {mean.size}/{std.size} values "
                            f"for {len(index)} bands; export the weights again")
        source = "weights"
    else:
        mean = np.zeros(len(index), dtype=np.float32)
        std = np.ones(len(index), dtype=np.float32)
        for j in present:
            mean[j] = float(x[:, j].mean())
            std[j] = float(x[:, j].std()) or 1.0
        source = "probe data"
    for j in range(len(index)):
        if index[j] is None:
            x[:, j] = 0.0  # the band mean after standardisation
        else:
            x[:, j] = (x[:, j] - mean[j]) / std[j]
    return torch.from_numpy(x), source


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, *, image_size: int,
                     batch_size: int = 64, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Globally average-pooled features ``[N, D]`` of a frozen timm backbone (eval mode)."""
    device = torch.device(device)
    model = model.to(device).eval()
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    out = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for s in starts:
        x = images[s:s + batch_size].to(device)
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > image_size)
        f = model.forward_features(x)
        if f.ndim == 4:  # CNN: [B, C, h, w]
            f = f.mean(dim=(2, 3))
        elif f.ndim == 3:  # ViT: [B, prefix + L, D]
            f = f[:, prefix:].mean(dim=1)
        out.append(f.float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- classifier
def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of ``k`` stratified folds: each class shuffled (seeded) and dealt round
    robin, continuing where the previous class stopped so fold sizes stay balanced."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    pos = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for i in idx:
            folds[pos % k].append(int(i))
            pos += 1
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int,
                 l2: float | Sequence[float] | torch.Tensor, *, weight: torch.Tensor | None = None,
                 max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: mean cross-entropy + l2/2 |W|^2, full-batch L-BFGS.

    ``x`` is ``[n, d]`` (one problem) or ``[G, n, d]`` (G independent problems, fitted at once
    by minimising the sum of their objectives, which has the same minimiser; rows with
    ``weight`` 0 are padding). ``l2`` is one value or one per problem. Returns ``W [(G,) d, k]``
    and ``b [(G,) k]``.
    """
    single = x.ndim == 2
    if single:
        x, y = x[None], y[None]
        weight = None if weight is None else weight[None]
    x = x.double()
    g, n, d = x.shape
    lam = torch.as_tensor(l2, dtype=torch.float64).reshape(-1).expand(g).reshape(g, 1, 1)
    wt = torch.ones(g, n, dtype=torch.float64) if weight is None else weight.double()
    wt = wt / wt.sum(dim=1, keepdim=True).clamp_min(1e-12)
    w = torch.zeros(g, d, n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(g, 1, n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(b, x, w)
        ce = F.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1), reduction="none")
        loss = (ce.reshape(g, n) * wt).sum() + 0.5 * (lam * w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach().squeeze(1)
    return (w[0], b[0]) if single else (w, b)


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _fit_predict(problems: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]],
                 n_classes: int) -> list[torch.Tensor]:
    """Predicted classes of each problem's test rows; problems are ``(x_train, y_train,
    x_test, l2)``, features standardised with their own training rows, all fitted at once."""
    n = max(len(p[0]) for p in problems)
    d = problems[0][0].shape[1]
    g = len(problems)
    xs = torch.zeros(g, n, d, dtype=torch.float64)
    ys = torch.zeros(g, n, dtype=torch.int64)
    wt = torch.zeros(g, n, dtype=torch.float64)
    tests = []
    for i, (x_tr, y_tr, x_te, _) in enumerate(problems):
        a, t = _standardise(x_tr.double(), x_te.double())
        xs[i, :len(a)], ys[i, :len(a)], wt[i, :len(a)] = a, y_tr, 1.0
        tests.append(t)
    w, b = fit_logistic(xs, ys, n_classes, [p[3] for p in problems], weight=wt)
    return [(t @ w[i] + b[i]).argmax(dim=1) for i, t in enumerate(tests)]


def cross_validate(features: torch.Tensor, labels: np.ndarray, folds: Sequence[np.ndarray], *,
                   l2: float | None = None, seed: int = 0,
                   grid: Sequence[float] = L2_GRID) -> dict[str, Any]:
    """Accuracy of the logistic-regression probe per fold, with mean and std.

    With ``l2=None`` each outer fold picks its L2 strength from ``grid`` by 3-fold inner
    cross-validation on its training rows (ties: the strongest). The fits are small (hundreds
    of rows), so they run batched on one CPU thread, which avoids thread contention.
    """
    n_classes = int(labels.max()) + 1
    f = features.detach().cpu().double()
    y = torch.from_numpy(labels)
    everything = np.arange(len(labels))
    outer = [(np.setdiff1d(everything, te), te) for te in folds]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chosen = [float(l2) if l2 is not None else 1e-2 for _ in outer]
        if l2 is None:
            problems, keys = [], []
            for o, (tr, _) in enumerate(outer):
                counts = np.bincount(labels[tr])
                k = int(min(3, counts[counts > 0].min()))
                if k < 2:
                    continue
                for ite in stratified_folds(labels[tr], k, seed + 7919):
                    itr = np.setdiff1d(np.arange(len(tr)), ite)
                    for lam in grid:
                        problems.append((f[tr][itr], y[tr][itr], f[tr][ite], float(lam)))
                        keys.append((o, float(lam), y[tr][ite]))
            scores: dict[tuple[int, float], list[float]] = {}
            if problems:
                for pred, (o, lam, truth) in zip(_fit_predict(problems, n_classes), keys):
                    scores.setdefault((o, lam), []).append(float((pred == truth).double().mean()))
            for o in range(len(outer)):
                mean = {lam: float(np.mean(scores[(o, float(lam))])) for lam in grid
                        if (o, float(lam)) in scores}
                if mean:
                    best = max(mean.values())
                    chosen[o] = max(lam for lam, v in mean.items() if v >= best - 1e-9)
        preds = _fit_predict([(f[tr], y[tr], f[te], chosen[o])
                              for o, (tr, te) in enumerate(outer)], n_classes)
        accs = [float((p == y[te]).double().mean()) for p, (_, te) in zip(preds, outer)]
    finally:
        torch.set_num_threads(threads)
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "fold_accuracies": accs, "l2": chosen, "feature_dim": int(features.shape[1])}


def knn_cross_validate(features: torch.Tensor, labels: np.ndarray, folds: Sequence[np.ndarray],
                       *, k: int = 20, temperature: float = 0.07) -> dict[str, Any]:
    """Accuracy of a weighted k-nearest-neighbour classifier per fold, with mean and std.

    DINO's kNN protocol: features standardised with the training rows' mean and std (so that
    no single large dimension dominates, as with random weights), L2-normalised; each test
    row takes the ``k`` most cosine-similar training rows, which vote with weight
    ``exp(similarity / temperature)``. Unlike the linear probe, nothing is fitted, so it
    shows whether the feature space itself groups the classes.
    """
    n_classes = int(labels.max()) + 1
    f = features.detach().cpu().double()
    y = torch.from_numpy(labels)
    everything = np.arange(len(labels))
    accs = []
    for te in folds:
        tr = np.setdiff1d(everything, te)
        a, t = _standardise(f[tr], f[te])
        a, t = F.normalize(a, dim=1), F.normalize(t, dim=1)
        sim = t @ a.T
        kk = min(k, len(tr))
        top, idx = sim.topk(kk, dim=1)
        votes = torch.zeros(len(te), n_classes, dtype=torch.float64)
        votes.scatter_add_(1, y[tr][idx], torch.exp(top / temperature))
        accs.append(float((votes.argmax(dim=1) == y[te]).double().mean()))
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "fold_accuracies": accs, "k": k}


def feature_spread(features: torch.Tensor) -> float:
    """Collapse check: the standard deviation over images of the L2-normalised features,
    averaged over dimensions and multiplied by sqrt(dim) (SimSiam's measure). Features spread
    evenly over the sphere give about 1; collapsed features (every image alike) give 0.
    Post-ReLU CNN features all lie in one orthant and give less even when healthy: compare
    with the same backbone's random weights."""
    f = F.normalize(features.detach().double(), dim=1)
    return float(f.std(dim=0).mean() * math.sqrt(f.shape[1]))


# -------------------------------------------------------------------------------- probe
def _drop_rare(data: ProbeData, minimum: int = 2) -> tuple[ProbeData, list[str]]:
    counts = np.bincount(data.labels, minlength=len(data.classes))
    keep = [k for k in range(len(data.classes)) if counts[k] >= minimum]
    dropped = [data.classes[k] for k in range(len(data.classes)) if counts[k] < minimum]
    if not dropped:
        return data, []
    sel = np.isin(data.labels, keep)
    remap = np.full(len(data.classes), -1)
    remap[keep] = np.arange(len(keep))
    origins = [o for o, s in zip(data.origins, sel) if s] if data.origins else []
    return ProbeData(data.images[sel], remap[data.labels[sel]], [data.classes[k] for k in keep],
                     data.band_names, data.dn_offset, data.task, data.source,
                     list(data.notes), origins), dropped


def probe(
    weights: str | Path | None,
    data_dir: str | Path | None = None,
    *,
    arch: str | None = None,
    catalog_dir: str | Path | None = None,
    data: ProbeData | None = None,
    folds: int = 5,
    seed: int = 0,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    l2: float | None = None,
    random_baseline: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear-probe ``weights`` (a ``backbone.safetensors`` from ``ssl4eo pretrain``) and the
    same architecture with random weights; see the module docstring for the protocol.

    Data: ``data`` if given, else EuroSAT-MS at ``data_dir`` (or the default EuroSAT-MS
    folder), else the synthetic task of ``catalog_dir``. ``weights=None`` probes only the
    random ``arch`` (its ``in_chans`` = the data's bands).

    Returns a dict: ``task``, ``data``, ``notes``, ``n_images``, ``classes``,
    ``class_counts``, ``chance`` (majority-class share), ``folds``, ``arch``, ``in_chans``,
    ``bands``, ``missing_bands``, ``image_size``, ``normalisation``, ``weights``, ``method``,
    and ``pretrained`` / ``random``, each ``{"accuracy_mean", "accuracy_std",
    "fold_accuracies", "l2", "feature_dim", "time_s"}``.
    """
    from .backbones import BackboneSpec
    from .export import load_backbone, random_backbone, spec_from_file

    t_start = time.perf_counter()
    if folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if weights is None and arch is None:
        raise UserError("give --weights (a backbone.safetensors) or --arch for a random-weights "
                        "probe")
    if data is None:
        data = resolve_probe_data(data_dir, catalog_dir, seed=seed, progress=progress)
    data, dropped = _drop_rare(data)
    if folds > len(data) // 2:
        raise UserError(f"--folds {folds} is too many for {len(data)} images; use at most "
                        f"{max(2, len(data) // 2)}")
    if len(data.classes) < 2:
        raise UserError(f"the probe data {data.source!r} has fewer than two classes with two or "
                        "more images; use a larger dataset")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    meta: dict[str, Any] = {}
    model = None
    if weights is not None:
        model, meta = load_backbone(weights, arch)
        spec = spec_from_file(weights, arch)
    else:
        assert arch is not None
        spec = BackboneSpec(arch, len(data.band_names), image_size if arch.startswith(
            ("vit_", "deit_")) else None)
    index, names, missing = select_bands(data, meta.get("band_names"), spec.in_chans)
    if missing:
        warnings.warn(f"probe data lacks bands {missing}; they are fed as zeros (the band "
                      "mean)", stacklevel=2)
    norm = None
    if "norm_mean" in meta and "norm_std" in meta:
        norm = (meta["norm_mean"], meta["norm_std"])
    s2_offset = int(meta.get("s2_offset", DEFAULT_S2_OFFSET if norm is not None else
                             data.dn_offset))
    x, norm_source = prepare_inputs(data, index, names, norm, s2_offset)
    if image_size is None:
        image_size = int(spec.img_size or meta.get("crop_size") or 224)
    if spec.img_size is not None and image_size != spec.img_size:
        raise UserError(f"{spec.arch} was built for {spec.img_size} px inputs; drop --image-size "
                        f"or pass --image-size {spec.img_size}")
    fold_idx = stratified_folds(data.labels, folds, seed)
    counts = np.bincount(data.labels)
    result: dict[str, Any] = {
        "task": data.task, "data": data.source, "notes": list(data.notes),
        "n_images": len(data), "classes": list(data.classes),
        "class_counts": data.class_counts(), "dropped_classes": dropped,
        "chance": float(counts.max() / counts.sum()), "folds": folds, "seed": seed,
        "arch": spec.arch, "in_chans": spec.in_chans, "bands": names, "missing_bands": missing,
        "image_size": image_size, "normalisation": norm_source, "s2_offset": s2_offset,
        "weights": None if weights is None else str(weights), "method": meta.get("method"),
        "device": str(device),
    }
    runs: list[tuple[str, nn.Module]] = []
    if model is not None:
        runs.append(("pretrained", model))
    if random_baseline or model is None:
        runs.append(("random", random_backbone(spec, seed)))
    for name, net in runs:
        t0 = time.perf_counter()
        feats = extract_features(net, x, image_size=image_size, batch_size=batch_size,
                                 device=device, progress=progress, desc=f"{name} features")
        if not torch.isfinite(feats).all():
            raise UserError(f"the {name} backbone gives non-finite features on {data.source!r}; "
                            "check the weights (a diverged run?) and the band statistics")
        res = cross_validate(feats, data.labels, fold_idx, l2=l2, seed=seed)
        res["time_s"] = time.perf_counter() - t0
        result[name] = res
    result["time_s"] = time.perf_counter() - t_start
    return result


_TASK_NAMES = {"eurosat-ms": "EuroSAT-MS",
               "synthetic-landcover": "the demo catalog's synthetic land cover (not EuroSAT)"}


def format_probe(result: dict[str, Any]) -> str:
    """A few human-readable lines for a :func:`probe` result."""
    lines = []
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    task = _TASK_NAMES.get(result["task"], result["task"])
    lines.append(
        f"linear probe on {task} ({result['n_images']} images, "
        f"{len(result['classes'])} classes, {result['folds']}-fold CV, chance "
        f"{result['chance']:.3f}); {result['arch']} with {result['in_chans']} bands at "
        f"{result['image_size']} px")
    for name in ("pretrained", "random"):
        r = result.get(name)
        if r:
            label = "pretrained weights" if name == "pretrained" else "random weights    "
            lines.append(f"  {label}: accuracy {r['accuracy_mean']:.3f} +- "
                         f"{r['accuracy_std']:.3f}")
    if result.get("missing_bands"):
        lines.append(f"  (bands missing in the data, fed as zeros: "
                     f"{', '.join(result['missing_bands'])})")
    return "\n".join(lines)


__all__ = [
    "EUROSAT_BANDS",
    "ProbeData",
    "cross_validate",
    "default_eurosat_dir",
    "extract_features",
    "feature_spread",
    "fit_logistic",
    "format_probe",
    "knn_cross_validate",
    "load_eurosat",
    "probe",
    "resolve_probe_data",
    "stratified_folds",
    "synthetic_probe_data",
]

