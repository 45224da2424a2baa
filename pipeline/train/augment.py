"""View recipes of the four methods, as multispectral tensor transforms.

Each recipe is a list with one callable per season view, to pass as ``transform=`` to
:class:`pipeline.loader.ZarrPatchDataset` with ``seasons="augment"`` (MoCo, DINO) or
``seasons="random"`` (MAE, data2vec: one view). The callables take a ``[C, H, W]`` float tensor
(already normalised by the loader) and a ``torch.Generator`` (``accepts_generator = True``), so
that a sample's views are a function of ``(seed, epoch, index)`` whichever worker or rank draws
them, which makes resumed runs exact.

The transforms themselves are those of :mod:`pipeline.transforms`; this module only assembles
them. SSL4EO-S12 recipes (anchors section 1.5), adapted to normalised multispectral data:

* MoCo-v2: RandomResizedCrop(224, scale 0.2-1); with p 0.8 brightness (+-0.4, an additive
  shift in units of the band std) and contrast (x 0.6-1.4 around the view mean); grayscale
  (all bands replaced by their mean) with p 0.2; Gaussian blur sigma 0.1-2 with p 0.5;
  horizontal flip.
* DINO: global crops 224 px (scale 0.14-1) from seasons 1 and 2, the MoCo colour recipe;
  ``n_local`` local crops 96 px (scale 0.05-0.14) from season 3, stacked in one tensor
  ``[n_local, C, 96, 96]``.
* MAE, data2vec: RandomResizedCrop(224, scale 0.2-1) + horizontal flip.

Below 224 px the views of a location are cut from one shared random region of
``264 x size / 224`` px (:class:`SharedRegion`, :func:`region_size`), so that a view pixel
covers the same ground as in the paper (about 10 m) and views overlap as much: the paper's
recipe on a whole 264 px patch at 64 px would zoom out 2-4 x, and a probe on 64 px EuroSAT
images at their native 10 m would meet scales the backbone never saw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..transforms import (
    Compose,
    GaussianBlur,
    RandomApply,
    RandomBrightnessContrast,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ToGray,
    Transform,
)

__all__ = ["MultiCrop", "SharedRegion", "dino_views", "masked_views", "moco_views", "recipe",
           "region_size", "split_views"]

View = Callable[..., torch.Tensor]


class MultiCrop(Transform):
    """``n`` independent draws of ``transform`` stacked: ``[n, C, h, w]`` (DINO local crops)."""

    def __init__(self, transform: View, n: int) -> None:
        self.transform = transform
        self.n = n

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.stack([self.transform(x, generator=generator) for _ in range(self.n)])


def _colour() -> list[Transform]:
    """SSL4EO-S12's MoCo-v2 colour recipe (anchors 1.5) on normalised data, then the flip."""
    return [
        RandomApply(RandomBrightnessContrast(0.4, 0.4), p=0.8),
        RandomApply(ToGray(), p=0.2),
        RandomApply(GaussianBlur((0.1, 2.0)), p=0.5),
        RandomHorizontalFlip(),
    ]


#: The paper's patch and crop sizes: crops of 224 px from 264 px patches.
PAPER_PATCH, PAPER_CROP = 264, 224


class SharedRegion(Transform):
    """A random ``size`` x ``size`` window, the same for every view of one item.

    Views of an item are drawn from one generator (the loader seeds it from seed, epoch and
    index), so ``generator.initial_seed()`` is the item's: the window is drawn from a generator
    seeded with it and does not advance the views' own draws. Without a generator each call
    draws its own window. Patches no larger than ``size`` pass unchanged.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        _, h, w = x.shape
        if h <= self.size and w <= self.size:
            return x
        g = None
        if generator is not None:
            g = torch.Generator().manual_seed(generator.initial_seed() ^ 0x5EED)
        top = int(torch.randint(0, max(1, h - self.size + 1), (), generator=g))
        left = int(torch.randint(0, max(1, w - self.size + 1), (), generator=g))
        return x[:, top:top + self.size, left:left + self.size]


def region_size(size: int) -> int | None:
    """Side of the :class:`SharedRegion` that keeps the paper's geometry at crop ``size``:
    ``264 x size / 224`` px below 224 px, else ``None`` (the whole patch, as the paper).

    The paper resizes crops of 20-100 % of a 264 px patch to 224 px (0.5-1.2 x zoom), and two
    views of a location overlap. The same area fractions resized to 64 px would zoom out 2-4 x:
    a probe on 64 px EuroSAT images at their native 10 m would meet scales the backbone never
    saw, and fine texture (what tells crops, pasture and towns apart) would be lost in the
    resize. Cutting a region of 264 x 64 / 224 = 75 px first, shared by the views, and applying
    the paper's recipe in it keeps both the ground size of a pixel and the overlap of views."""
    return round(PAPER_PATCH * size / PAPER_CROP) if size < PAPER_CROP else None


def _region(region: int | None) -> list[Transform]:
    return [SharedRegion(region)] if region else []


def moco_views(size: int = 224, region: int | None = None) -> list[View]:
    """MoCo-v2 (``--aug-plus``): two views, same recipe (in a shared ``region`` if given)."""
    t = Compose([*_region(region), RandomResizedCrop(size, scale=(0.2, 1.0)), *_colour()])
    return [t, t]


def dino_views(global_size: int = 224, local_size: int = 96, n_local: int = 8,
               global_scale: tuple[float, float] = (0.14, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.14), region: int | None = None
               ) -> list[View]:
    """DINO season-aware multi-crop: global from views 0 and 1, ``n_local`` local from view 2
    (all in a shared ``region`` if given)."""
    g = Compose([*_region(region), RandomResizedCrop(global_size, scale=global_scale),
                 *_colour()])
    local = Compose([*_region(region), MultiCrop(
        Compose([RandomResizedCrop(local_size, scale=local_scale), *_colour()]), n_local
    )])
    return [g, g, local]


def masked_views(size: int = 224, region: int | None = None) -> list[View]:
    """MAE / data2vec: RandomResizedCrop(scale 0.2-1) + flip, one view (in ``region``)."""
    return [Compose([*_region(region), RandomResizedCrop(size, scale=(0.2, 1.0)),
                     RandomHorizontalFlip()])]


def recipe(method: str, size: int, *, local_size: int | None = None, n_local: int = 8,
           keep_ground_size: bool = True) -> list[View]:
    """The view transforms of ``method`` at crop ``size`` (DINO local crops at ``local_size``).

    ``keep_ground_size``: below 224 px, the views are cut from a shared region of
    :func:`region_size` px, so that a view pixel covers the ground it covers in the paper's
    recipe and views overlap as they do there (``False``: the paper's recipe on the whole
    patch, zoomed out).
    """
    region = region_size(size) if keep_ground_size else None
    if method == "moco":
        return moco_views(size, region)
    if method == "dino":
        # local crops keep DINO's 96/224 ratio, rounded to whole 16 px patches (ViT/16)
        local = local_size or max(16, 16 * round(size * 96 / 224 / 16))
        return dino_views(size, local, n_local, region=region)
    return masked_views(size, region)


def split_views(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Flatten collated views: a ``[B, n, C, h, w]`` entry (stacked local crops) becomes n views."""
    out: list[torch.Tensor] = []
    for v in views:
        if v.ndim == 5:
            out.extend(v.unbind(1))
        else:
            out.append(v)
    return out
