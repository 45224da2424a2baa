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

__all__ = ["MultiCrop", "dino_views", "masked_views", "moco_views", "recipe", "split_views"]

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


def moco_views(size: int = 224) -> list[View]:
    """MoCo-v2 (``--aug-plus``): two views, same recipe."""
    t = Compose([RandomResizedCrop(size, scale=(0.2, 1.0)), *_colour()])
    return [t, t]


def dino_views(global_size: int = 224, local_size: int = 96, n_local: int = 8,
               global_scale: tuple[float, float] = (0.14, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.14)) -> list[View]:
    """DINO season-aware multi-crop: global from views 0 and 1, ``n_local`` local from view 2."""
    g = Compose([RandomResizedCrop(global_size, scale=global_scale), *_colour()])
    local = MultiCrop(
        Compose([RandomResizedCrop(local_size, scale=local_scale), *_colour()]), n_local
    )
    return [g, g, local]


def masked_views(size: int = 224) -> list[View]:
    """MAE / data2vec: RandomResizedCrop(scale 0.2-1) + flip, one view."""
    return [Compose([RandomResizedCrop(size, scale=(0.2, 1.0)), RandomHorizontalFlip()])]


def recipe(method: str, size: int, *, local_size: int | None = None, n_local: int = 8
           ) -> list[View]:
    """The view transforms of ``method`` at crop ``size`` (DINO local crops at ``local_size``)."""
    if method == "moco":
        return moco_views(size)
    if method == "dino":
        # local crops keep DINO's 96/224 ratio, rounded to whole 16 px patches (ViT/16)
        local = local_size or max(16, 16 * round(size * 96 / 224 / 16))
        return dino_views(size, local, n_local)
    return masked_views(size)


def split_views(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Flatten collated views: a ``[B, n, C, h, w]`` entry (stacked local crops) becomes n views."""
    out: list[torch.Tensor] = []
    for v in views:
        if v.ndim == 5:
            out.extend(v.unbind(1))
        else:
            out.append(v)
    return out
