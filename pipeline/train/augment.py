"""View recipes of the four methods, as multispectral tensor transforms.

Each recipe is a list with one callable per season view, to pass as ``transform=`` to
:class:`pipeline.loader.ZarrPatchDataset` with ``seasons="augment"`` (MoCo, DINO) or
``seasons="random"`` (MAE, data2vec: one view). The callables take a ``[C, H, W]`` float tensor
(already normalised by the loader) and a ``torch.Generator`` (``accepts_generator = True``), so
that a sample's views are a function of ``(seed, epoch, index)`` whichever worker or rank draws
them, which makes resumed runs exact.

SSL4EO-S12 recipes (anchors section 1.5), adapted to normalised multispectral data:

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

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[..., torch.Tensor]


def _u(g: torch.Generator | None, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


class RandomResizedCrop:
    """Crop a random area fraction ``scale`` and aspect ``ratio``, resize to ``size`` (bilinear)."""

    accepts_generator = True

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def params(self, h: int, w: int, g: torch.Generator | None) -> tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _u(g, *self.scale)
            aspect = math.exp(_u(g, *log_r))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                return top, left, ch, cw
        side = min(h, w)  # fallback: centre crop
        return (h - side) // 2, (w - side) // 2, side, side

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left, ch, cw = self.params(x.shape[-2], x.shape[-1], generator)
        crop = x[..., top:top + ch, left:left + cw]
        out = F.interpolate(crop.unsqueeze(0), size=(self.size, self.size), mode="bilinear",
                            align_corners=False, antialias=ch > self.size or cw > self.size)
        return out.squeeze(0)


class HorizontalFlip:
    accepts_generator = True

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.flip(-1) if _u(generator) < self.p else x


class BrightnessContrast:
    """With probability ``p``: add a brightness shift and scale the contrast (random order)."""

    accepts_generator = True

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, p: float = 0.8) -> None:
        self.brightness, self.contrast, self.p = brightness, contrast, p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if _u(generator) >= self.p:
            return x
        shift = _u(generator, -self.brightness, self.brightness)
        factor = _u(generator, 1 - self.contrast, 1 + self.contrast)
        if _u(generator) < 0.5:
            x = x + shift
            return (x - x.mean()) * factor + x.mean()
        x = (x - x.mean()) * factor + x.mean()
        return x + shift


class Grayscale:
    """With probability ``p`` replace every band by the mean over bands (``ToGray(13)``)."""

    accepts_generator = True

    def __init__(self, p: float = 0.2) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if _u(generator) >= self.p:
            return x
        return x.mean(dim=-3, keepdim=True).expand_as(x).clone()


class GaussianBlur:
    """With probability ``p`` blur with sigma in ``sigma`` (pixels), separable kernel."""

    accepts_generator = True

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> None:
        self.sigma, self.p = sigma, p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if _u(generator) >= self.p:
            return x
        s = _u(generator, *self.sigma)
        radius = max(1, int(math.ceil(3 * s)))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        k = torch.exp(-(t ** 2) / (2 * s * s))
        k = k / k.sum()
        c = x.shape[-3]
        y = x.reshape(1, c, *x.shape[-2:])
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
        y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
        return y.reshape(x.shape)


class Compose:
    accepts_generator = True

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x


class MultiCrop:
    """``n`` independent draws of ``transform`` stacked: ``[n, C, h, w]`` (DINO local crops)."""

    accepts_generator = True

    def __init__(self, transform: Transform, n: int) -> None:
        self.transform, self.n = transform, n

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([self.transform(x, generator=generator) for _ in range(self.n)])


def _colour() -> list[Transform]:
    return [BrightnessContrast(0.4, 0.4, p=0.8), Grayscale(0.2), GaussianBlur((0.1, 2.0), 0.5),
            HorizontalFlip()]


def moco_views(size: int = 224) -> list[Transform]:
    """MoCo-v2 (``--aug-plus``): two views, same recipe."""
    t = Compose([RandomResizedCrop(size, (0.2, 1.0)), *_colour()])
    return [t, t]


def dino_views(global_size: int = 224, local_size: int = 96, n_local: int = 8,
               global_scale: tuple[float, float] = (0.14, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.14)) -> list[Transform]:
    """DINO season-aware multi-crop: global from views 0 and 1, ``n_local`` local from view 2."""
    g = Compose([RandomResizedCrop(global_size, global_scale), *_colour()])
    local = MultiCrop(Compose([RandomResizedCrop(local_size, local_scale), *_colour()]), n_local)
    return [g, g, local]


def masked_views(size: int = 224) -> list[Transform]:
    """MAE / data2vec: RandomResizedCrop(scale 0.2-1) + flip, one view."""
    return [Compose([RandomResizedCrop(size, (0.2, 1.0)), HorizontalFlip()])]


def recipe(method: str, size: int, *, local_size: int | None = None, n_local: int = 8
           ) -> list[Transform]:
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
