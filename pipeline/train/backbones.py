"""Backbones from timm, sized for multispectral input.

Every backbone is a plain ``timm`` model created with ``num_classes=0`` and ``in_chans`` taken
from the store, so that its ``state_dict`` is exactly what ``timm.create_model(arch,
in_chans=C, num_classes=0)`` expects: the exported weights load back with strict key matching.

Paper sizes: ``resnet50`` (MoCo-v2, DINO) and ``vit_small_patch16_224`` (DINO, MAE, data2vec).
Small sizes for tests and CPU demos: ``resnet18`` and ``vit_tiny_patch16_224`` with ``img_size``
set to the crop size (64 or 96), and optionally ``patch_size`` 8 (64 tokens at 64 px rather
than 16: with it MAE moves ahead of random weights on EuroSAT, ``benchmarks/learning.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

#: Architectures the methods accept, by family (any timm resnet*/vit_* name also works).
PAPER_ARCHS = {"moco": "resnet50", "dino": "resnet50", "mae": "vit_small_patch16_224",
               "data2vec": "vit_small_patch16_224"}


@dataclass(frozen=True)
class BackboneSpec:
    """What is needed to rebuild a backbone: timm name, input channels and (ViT) image size."""

    arch: str
    in_chans: int
    img_size: int | None = None  # ViT only; None keeps timm's default (224)
    patch_size: int | None = None  # ViT only; None keeps the name's (16 for *_patch16_*)

    @property
    def is_vit(self) -> bool:
        return is_vit(self.arch)

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model`` that rebuild this backbone."""
        kwargs: dict = {"in_chans": self.in_chans, "num_classes": 0}
        if self.is_vit and self.img_size is not None:
            kwargs["img_size"] = self.img_size
        if self.is_vit and self.patch_size is not None:
            kwargs["patch_size"] = self.patch_size
        return kwargs


def is_vit(arch: str) -> bool:
    """True for timm Vision Transformer names (``vit_*``, ``deit_*``)."""
    return arch.startswith(("vit_", "deit_"))


def create_backbone(spec: BackboneSpec, *, dynamic_img_size: bool = False) -> nn.Module:
    """Create the timm backbone described by ``spec`` (random initialisation).

    ``dynamic_img_size`` (ViT only) lets one model take crops of several sizes (DINO's 96 px
    local crops next to 224 px global crops) by interpolating the position embeddings; it does
    not change the parameter names or shapes.
    """
    import timm

    if not timm.is_model(spec.arch):
        raise UserError(
            f"backbone {spec.arch!r} is not a timm model name; use e.g. resnet50, resnet18, "
            "vit_small_patch16_224 or vit_tiny_patch16_224 (see timm.list_models())"
        )
    kwargs = spec.timm_kwargs()
    if spec.is_vit and dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if spec.is_vit:
        if getattr(model, "cls_token", None) is None or getattr(model, "no_embed_class", False):
            raise UserError(
                f"backbone {spec.arch!r}: the ViT methods need a class token with a position "
                "embedding (timm's default vit_* layout); pick a vit_*_patch16_* model"
            )
    return model


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled feature vector a ``num_classes=0`` timm model returns."""
    return int(model.num_features)


def vit_patch_size(model: nn.Module) -> int:
    """Patch size of a timm ViT."""
    ps = model.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, tuple | list) else ps)


def vit_grid(model: nn.Module) -> tuple[int, int]:
    """Patch grid (rows, cols) of a timm ViT at its configured image size."""
    return tuple(int(g) for g in model.patch_embed.grid_size)  # type: ignore[return-value]


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[1, (1+) H*W, dim]`` (MAE's ``pos_embed.py``)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                            torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos: torch.Tensor) -> torch.Tensor:  # [M] -> [M, dim/2]
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    pe = torch.cat([emb(yy), emb(xx)], dim=1)  # [H*W, dim]; MAE puts h first
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim, dtype=torch.float64), pe], dim=0)
    return pe.float().unsqueeze(0)


def vit_tokens(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """Patch tokens ``[B, L, D]`` of a timm ViT with their position embedding added (no cls)."""
    x = model.patch_embed(imgs)
    if x.ndim == 4:  # dynamic_img_size keeps NHWC
        b, h, w, d = x.shape
        pos = _pos_embed_for(model, (h, w))
        return x.reshape(b, h * w, d) + pos
    return x + model.pos_embed[:, model.num_prefix_tokens:]


def vit_cls_token(model: nn.Module, batch: int) -> torch.Tensor:
    """The class token ``[B, 1, D]`` with its position embedding."""
    cls = model.cls_token + model.pos_embed[:, :1]
    return cls.expand(batch, -1, -1)


def _pos_embed_for(model: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Patch position embedding resampled to ``grid`` (bicubic, as timm does)."""
    import torch.nn.functional as F

    pe = model.pos_embed[:, model.num_prefix_tokens:]
    gh, gw = vit_grid(model)
    if (gh, gw) == tuple(grid):
        return pe
    d = pe.shape[-1]
    pe = pe.reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=grid, mode="bicubic", align_corners=False)
    return pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)
