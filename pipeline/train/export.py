"""Export a pretrained backbone as safetensors that timm loads with strict key matching.

The file holds exactly the ``state_dict`` of ``timm.create_model(arch, in_chans=C,
num_classes=0[, img_size=S, patch_size=P])``, plus string metadata (``ssl4eo:*`` keys) saying how
to rebuild the model and prepare inputs: architecture, channel count, image and patch size
(``patch_size`` only when it is not the name's), band names, method and
the normalisation statistics used in pretraining. Load it with timm::

    timm.create_model(arch, in_chans=C, num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="backbone.safetensors"))

or with :func:`load_backbone`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .backbones import BackboneSpec, create_backbone

META_PREFIX = "ssl4eo:"


def export_backbone(backbone: nn.Module, path: str | Path, spec: BackboneSpec,
                    **metadata: Any) -> Path:
    """Write ``backbone``'s weights to ``path`` (safetensors) with rebuild metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    # check against a fresh timm model before writing: a mismatch here is a bug, not user input
    reference = create_backbone(spec).state_dict()
    if set(state) != set(reference):
        missing = sorted(set(reference) - set(state))[:5]
        extra = sorted(set(state) - set(reference))[:5]
        raise RuntimeError(f"backbone keys differ from timm {spec.arch}: missing {missing}, extra {extra}")
    meta = {
        f"{META_PREFIX}arch": spec.arch,
        f"{META_PREFIX}in_chans": str(spec.in_chans),
        f"{META_PREFIX}img_size": "" if spec.img_size is None else str(spec.img_size),
    }
    if spec.patch_size is not None:  # absent: the name's patch size (files from before)
        meta[f"{META_PREFIX}patch_size"] = str(spec.patch_size)
    for key, value in metadata.items():
        meta[f"{META_PREFIX}{key}"] = value if isinstance(value, str) else json.dumps(value)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``ssl4eo:*`` metadata of an exported file (JSON values decoded), without prefix."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} does not exist; pass the backbone.safetensors "
                        "written by `ssl4eo pretrain` (in its --out directory)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"weights file {str(path)!r} is not a readable safetensors file ({exc})") from exc
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key[len(META_PREFIX):]
        try:
            out[name] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[name] = value
    if "img_size" in out and out["img_size"] in ("", None):
        out["img_size"] = None
    return out


def spec_from_file(path: str | Path, arch: str | None = None) -> BackboneSpec:
    """The :class:`BackboneSpec` stored in ``path`` (``arch`` must agree when given)."""
    meta = read_metadata(path)
    stored = meta.get("arch")
    if arch and stored and arch != stored:
        raise UserError(f"--arch {arch} does not match the weights in {str(path)!r}, which are "
                        f"{stored}; drop --arch or pass --arch {stored}")
    arch = arch or stored
    if not arch or "in_chans" not in meta:
        raise UserError(f"weights file {str(path)!r} has no ssl4eo metadata; pass --arch and "
                        "--in-chans, or export it with `ssl4eo pretrain`")
    img, patch = meta.get("img_size"), meta.get("patch_size")
    return BackboneSpec(arch, int(meta["in_chans"]), int(img) if img else None,
                        int(patch) if patch else None)


def load_backbone(path: str | Path, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A timm backbone with the weights in ``path`` loaded strictly, and the file's metadata.

    The model is ``timm.create_model(arch, in_chans=C, num_classes=0[, img_size=S,
    patch_size=P])`` and the
    file's tensors go in with ``load_state_dict(strict=True)`` (timm's ``pretrained=True``
    route also works, but warns that the first convolution has more than 3 channels).
    """
    import timm
    from safetensors.torch import load_file

    spec = spec_from_file(path, arch)
    model = timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs())
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise UserError(f"weights file {str(path)!r} does not fit timm {spec.arch} with "
                        f"in_chans={spec.in_chans}: {str(exc)[:300]}") from exc
    return model, read_metadata(path)


def random_backbone(spec: BackboneSpec, seed: int = 0) -> nn.Module:
    """The same architecture with random weights (the probe's baseline), seeded."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return create_backbone(spec)
    finally:
        torch.random.set_rng_state(state)
