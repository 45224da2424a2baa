"""Augmentations for multispectral tensors [C, H, W] (any number of bands), torch only.

torchvision's colour transforms assume 1 or 3 channels; these work on 2 (S1) to 13 (S2 L1C)
bands and more, keep the band order and the input dtype (integer inputs are computed in
float32, rounded and clipped back), and follow SSL4EO-S12's pretraining recipe::

    Compose([
        RandomResizedCrop(224, scale=(0.2, 1.0)),
        RandomApply([RandomBrightness(0.4), RandomContrast(0.4)], p=0.8),
        RandomApply([ToGray()], p=0.2),
        RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        RandomHorizontalFlip(),
    ])

(:func:`ssl4eo_moco_augmentation` builds it). Brightness and contrast act per image on
normalised data: brightness multiplies by a factor in ``[1 - b, 1 + b]``, contrast scales each
band about its own mean, as the SSL4EO-S12 scripts do. :class:`RandomBrightnessContrast` is the
ColorJitter-like variant the training recipes (:mod:`pipeline.train.augment`) use on
normalised data: an additive brightness shift (in units of the band std) and a contrast scale
about the image mean, applied in random order.

Every transform takes an optional ``generator`` (a :class:`torch.Generator`) at call time, so
that an item's augmentation can be reproduced; without one, torch's global generator is used.
The datasets in :mod:`pipeline.loader` pass a generator seeded from (seed, epoch, sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CenterCrop",
    "Compose",
    "GaussianBlur",
    "Normalize",
    "RandomApply",
    "RandomBrightness",
    "RandomBrightnessContrast",
    "RandomContrast",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RandomVerticalFlip",
    "Resize",
    "ToGray",
    "Transform",
    "ssl4eo_moco_augmentation",
]


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a [C, H, W] tensor, got {shape}")


def _restore(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a float result back to ``dtype`` (integers: rounded and clipped to the range)."""
    if y.dtype == dtype:
        return y
    if dtype.is_floating_point:
        return y.to(dtype)
    if dtype == torch.bool:
        return y > 0.5
    info = torch.iinfo(dtype)
    return y.round().clamp(info.min, info.max).to(dtype)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(torch.float32)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Transform:
    """Base class: ``t(x, generator=None)`` on a [C, H, W] tensor."""

    accepts_generator = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check(x)
        return self.apply(x, generator)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _call(t: Callable, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if getattr(t, "accepts_generator", False):
        return t(x, generator=generator)
    return t(x)


class Compose(Transform):
    """Apply transforms in order (other callables, e.g. torchvision's, are called as ``t(x)``)."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        for t in self.transforms:
            x = _call(t, x, generator)
        return x


class RandomApply(Transform):
    """Apply ``transforms`` (one callable or a list, in order) with probability ``p``."""

    def __init__(self, transforms: Callable | Sequence[Callable], p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], not {p}")
        self.transforms = list(transforms) if isinstance(transforms, Sequence) else [transforms]
        self.p = p

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if float(torch.rand((), generator=generator)) >= self.p:
            return x
        for t in self.transforms:
            x = _call(t, x, generator)
        return x


class RandomHorizontalFlip(Transform):
    """Flip left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x.flip(-1) if float(torch.rand((), generator=generator)) < self.p else x


class RandomVerticalFlip(Transform):
    """Flip top-bottom with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x.flip(-2) if float(torch.rand((), generator=generator)) < self.p else x


def _resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    y = F.interpolate(
        _as_float(x)[None], size=size, mode="bilinear", align_corners=False, antialias=antialias
    )[0]
    return _restore(y, x.dtype)


class Resize(Transform):
    """Bilinear resize to ``size`` (int or (h, w))."""

    def __init__(self, size: int | Sequence[int], antialias: bool = True) -> None:
        self.size = _pair(size)
        self.antialias = antialias

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return _resize(x, self.size, self.antialias)


class CenterCrop(Transform):
    """Crop the centre ``size`` (int or (h, w)); the image must be at least that large."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        th, tw = self.size
        if th > h or tw > w:
            raise ValueError(f"CenterCrop{self.size} is larger than the image ({h}, {w})")
        top, left = (h - th) // 2, (w - tw) // 2
        return x[:, top : top + th, left : left + tw]


class RandomResizedCrop(Transform):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform),
    resized bilinearly to ``size``; torchvision's sampling rule (10 tries, then centre crop)."""

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        antialias: bool = True,
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size = _pair(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.antialias = antialias

    def params(
        self, h: int, w: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop."""
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=generator))
                left = int(torch.randint(0, w - cw + 1, (), generator=generator))
                return top, left, ch, cw
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        top, left, ch, cw = self.params(x.shape[-2], x.shape[-1], generator)
        return _resize(x[:, top : top + ch, left : left + cw], self.size, self.antialias)


class RandomBrightness(Transform):
    """Multiply the whole image by a factor drawn from ``[max(0, 1 - b), 1 + b]``."""

    def __init__(self, brightness: float = 0.4) -> None:
        if brightness < 0:
            raise ValueError(f"brightness must be >= 0, not {brightness}")
        self.brightness = brightness

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        s = _uniform(max(0.0, 1 - self.brightness), 1 + self.brightness, generator)
        return _restore(_as_float(x) * s, x.dtype)


class RandomContrast(Transform):
    """Scale each band about its own mean by a factor from ``[max(0, 1 - c), 1 + c]``."""

    def __init__(self, contrast: float = 0.4) -> None:
        if contrast < 0:
            raise ValueError(f"contrast must be >= 0, not {contrast}")
        self.contrast = contrast

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        s = _uniform(max(0.0, 1 - self.contrast), 1 + self.contrast, generator)
        xf = _as_float(x)
        mean = xf.mean(dim=(-2, -1), keepdim=True)
        return _restore((xf - mean) * s + mean, x.dtype)


class RandomBrightnessContrast(Transform):
    """ColorJitter-like brightness and contrast for normalised data, in random order.

    Brightness adds a shift drawn from ``[-b, b]`` (units of the band std once normalised);
    contrast scales the image about its mean over all bands and pixels by a factor from
    ``[1 - c, 1 + c]``. Wrap it in :class:`RandomApply` for SSL4EO-S12's ``p = 0.8``.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4) -> None:
        if brightness < 0 or contrast < 0:
            raise ValueError(f"brightness and contrast must be >= 0, not {brightness}, {contrast}")
        self.brightness = brightness
        self.contrast = contrast

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        shift = _uniform(-self.brightness, self.brightness, generator)
        factor = _uniform(1 - self.contrast, 1 + self.contrast, generator)
        brightness_first = float(torch.rand((), generator=generator)) < 0.5
        y = _as_float(x)
        if brightness_first:
            y = y + shift
        y = (y - y.mean()) * factor + y.mean()
        if not brightness_first:
            y = y + shift
        return _restore(y, x.dtype)


class ToGray(Transform):
    """Grey image for multispectral input: the mean over bands, replicated to every band."""

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        gray = _as_float(x).mean(dim=0, keepdim=True)
        return _restore(gray.expand_as(x).contiguous(), x.dtype)


class GaussianBlur(Transform):
    """Gaussian blur with sigma drawn uniformly from ``sigma`` (pixels), per band.

    The kernel covers +-3 sigma (``kernel_size`` fixes it instead); borders are reflected.
    """

    def __init__(
        self, sigma: tuple[float, float] = (0.1, 2.0), kernel_size: int | None = None
    ) -> None:
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {sigma}")
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be odd and positive, not {kernel_size}")
        self.sigma = tuple(sigma)
        self.kernel_size = kernel_size

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        sigma = _uniform(self.sigma[0], self.sigma[1], generator)
        c, h, w = x.shape
        k = self.kernel_size or 2 * math.ceil(3 * sigma) + 1
        half = min(k // 2, h - 1, w - 1)
        if half < 1:
            return x
        xf = _as_float(x)[:, None]  # (C, 1, H, W): one image per band
        t = torch.arange(-half, half + 1, dtype=xf.dtype)
        kern = torch.exp(-(t**2) / (2 * sigma * sigma))
        kern = kern / kern.sum()
        xf = F.pad(xf, (half, half, half, half), mode="reflect")
        xf = F.conv2d(xf, kern.view(1, 1, 1, -1))
        xf = F.conv2d(xf, kern.view(1, 1, -1, 1))
        return _restore(xf[:, 0], x.dtype)


class Normalize(Transform):
    """``(x - mean) / std`` per band (float output)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"{len(mean)} means but {len(std)} stds")
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if x.shape[0] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} bands, the image {x.shape[0]}")
        xf = _as_float(x)
        mean = torch.tensor(self.mean, dtype=xf.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=xf.dtype).view(-1, 1, 1)
        return (xf - mean) / std


def ssl4eo_moco_augmentation(
    size: int = 224, scale: tuple[float, float] = (0.2, 1.0)
) -> Compose:
    """The MoCo-v2 augmentation of SSL4EO-S12 (``pretrain_moco_v2_s2c.py``, ``--aug-plus``)."""
    return Compose([
        RandomResizedCrop(size, scale=scale),
        RandomApply([RandomBrightness(0.4), RandomContrast(0.4)], p=0.8),
        RandomApply([ToGray()], p=0.2),
        RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        RandomHorizontalFlip(),
    ])
