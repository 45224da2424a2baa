"""The four pretraining methods of SSL4EO-S12: MoCo-v2, DINO, MAE and data2vec.

Every method is an ``nn.Module`` with the same small interface, which the engine relies on:

* ``forward(views) -> loss``: ``views`` is a list of ``[B, C, H, W]`` batches (the augmented
  views of one batch of locations, views from independently drawn seasons). ``forward`` does
  not change any state except through autograd.
* ``after_step(step, total_steps)``: the non-gradient updates after ``optimizer.step()``:
  EMA teachers / key encoders, MoCo's queue, DINO's centre.
* ``backbone``: the student timm model (the one the optimizer trains); ``exported``: the
  timm model written as the pretrained weights, the backbone except for DINO, whose EMA
  teacher is (the DINO paper evaluates and releases the teacher).
* all state needed for exact resume (queue, centre, teacher) is in ``state_dict()``.

Defaults are the paper's (``docs/reference/ssl4eo_anchors.md`` section 1.5); the constructors
take smaller values for tests.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import dist as D
from .backbones import (
    BackboneSpec,
    create_backbone,
    feature_dim,
    sincos_pos_embed,
    vit_cls_token,
    vit_grid,
    vit_patch_size,
)

METHODS = ("moco", "dino", "mae", "data2vec")


@dataclass
class MethodDefaults:
    """Paper hyper-parameters of one method (section 1.5 of the anchors)."""

    arch: str
    optimizer: str  # "sgd" or "adamw"
    lr: float
    weight_decay: float
    warmup_epochs: float
    lr_scaling: str = "none"  # "linear": lr = lr * global_batch / 256 (MAE's blr)
    clip_grad: float | None = None
    crop_size: int = 224
    extra: dict[str, Any] = field(default_factory=dict)


#: Paper defaults. MoCo-v2: SGD lr 0.03, wd 1e-4 (batch 256, no scaling, no warmup);
#: DINO RN50: SGD lr 0.03 wd 1e-4, warmup 10; DINO ViT-S/16: AdamW lr 1.5e-4, warmup 10 (the
#: DINO script's wd 0.04 start value, held constant); DINO scales its lr by global batch / 256
#: (``pretrain_dino_s2c.py``: "linear scaling rule"), the same values at the paper's 4 x 64;
#: MAE ViT-S/16: blr 1.5e-4 (x batch/256), wd 0.05, warmup 10; data2vec ViT-S/16: lr 1e-3,
#: wd 0.05, warmup 10 (BEiT defaults, no scaling).
DEFAULTS: dict[str, MethodDefaults] = {
    "moco": MethodDefaults("resnet50", "sgd", 0.03, 1e-4, 0.0),
    "dino": MethodDefaults("resnet50", "sgd", 0.03, 1e-4, 10.0, lr_scaling="linear",
                           clip_grad=3.0),
    "dino_vit": MethodDefaults("vit_small_patch16_224", "adamw", 1.5e-4, 0.04, 10.0,
                               lr_scaling="linear", clip_grad=3.0),
    "mae": MethodDefaults("vit_small_patch16_224", "adamw", 1.5e-4, 0.05, 10.0, lr_scaling="linear"),
    "data2vec": MethodDefaults("vit_small_patch16_224", "adamw", 1e-3, 0.05, 10.0, clip_grad=3.0),
}


def method_defaults(method: str, arch: str | None = None) -> MethodDefaults:
    """Defaults for ``method`` (DINO's depend on whether the backbone is a ViT)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "dino" and arch is not None and arch.startswith(("vit_", "deit_")):
        return DEFAULTS["dino_vit"]
    return DEFAULTS[method]


class Method(nn.Module):
    """Common base: see the module docstring for the interface."""

    name = "method"
    #: how many season views the dataset must provide per location
    num_season_views = 2

    @property
    def backbone(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def exported(self) -> nn.Module:
        """The encoder written as the pretrained weights (default: the backbone)."""
        return self.backbone

    def after_step(self, step: int, total_steps: int) -> None:
        """Non-gradient state updates after the optimizer step (default: none)."""

    def on_after_backward(self, epoch: int) -> None:
        """Gradient surgery between backward and optimizer step (default: none)."""

    def backbones(self) -> list[nn.Module]:
        """The encoders (student and teacher / key encoder)."""
        return [self.backbone]

    def compile_targets(self) -> list[nn.Module]:
        """Modules whose ``__call__`` the engine compiles with ``--compile``
        (``nn.Module.compile``: parameter names stay the same). Default: the encoders, for
        methods that call them whole."""
        return self.backbones()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, parameter by parameter (buffers copied)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ------------------------------------------------------------------------------------- MoCo-v2
class MoCo(Method):
    """MoCo-v2 (He et al. 2020; Chen et al. 2020): query/key encoders, a queue of negatives.

    Paper setting: ResNet-50, 2-layer MLP head to 128-d, queue 65,536, T 0.2, m 0.999. In DDP
    the key batch is shuffled across ranks (MoCo's shuffling BN). In one process BatchNorm
    would see a location's query and key in batches of the same locations, whose statistics
    leak which key belongs to which query (a shortcut that lowers the loss without learning
    the image); so there the batch is split into ``bn_splits`` groups normalised separately
    (the SplitBatchNorm of MoCo's single-GPU CIFAR demo), the keys shuffled before the split,
    and a location's query and key fall in different groups.
    """

    name = "moco"

    def __init__(self, spec: BackboneSpec, dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.2, mlp: bool = True,
                 bn_splits: int = 4) -> None:
        super().__init__()
        if bn_splits < 1:
            raise UserError(f"MoCo bn_splits {bn_splits}: give 1 (off) or more groups")
        self.bn_splits = bn_splits
        self.momentum = momentum
        self.temperature = temperature
        self.queue_size = queue_size
        self.encoder_q = create_backbone(spec)
        fd = feature_dim(self.encoder_q)
        self.head_q = (nn.Sequential(nn.Linear(fd, fd), nn.ReLU(inplace=True), nn.Linear(fd, dim))
                       if mlp else nn.Linear(fd, dim))
        self.encoder_k = _freeze(copy.deepcopy(self.encoder_q))
        self.head_k = _freeze(copy.deepcopy(self.head_q))
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q

    def backbones(self) -> list[nn.Module]:
        return [self.encoder_q, self.encoder_k]

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        im_q, im_k = views[0], views[1]
        splits = self._local_splits(im_q.shape[0])
        if splits > 1:
            q = torch.cat([self.encoder_q(c) for c in im_q.chunk(splits)])
        else:
            q = self.encoder_q(im_q)
        q = F.normalize(self.head_q(q).float(), dim=1)
        with torch.no_grad():
            if splits > 1:
                # shuffled, so that query i and key i sit in different BN groups
                perm = torch.randperm(im_k.shape[0], device=im_k.device)
                k = torch.cat([self.encoder_k(c) for c in im_k[perm].chunk(splits)])
                k = k[torch.argsort(perm)]
            else:
                im_k, unshuffle = _batch_shuffle(im_k)
                k = _batch_unshuffle(self.encoder_k(im_k), unshuffle)
            k = F.normalize(self.head_k(k).float(), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().detach()
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._pending_keys = k.detach()
        return F.cross_entropy(logits, labels)

    def _local_splits(self, batch: int) -> int:
        """BN groups for one process: at most ``bn_splits``, the most that divide the batch
        into groups of 4 or more (fewer samples make BN statistics too noisy); 1 without
        BatchNorm and under DDP (which shuffles across ranks instead)."""
        if D.is_distributed() or not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                         for m in self.encoder_q.modules()):
            return 1
        s = self.bn_splits
        while s > 1 and (batch % s or batch // s < 4):
            s -= 1
        return s

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.encoder_k, self.encoder_q, self.momentum)
        ema_update(self.head_k, self.head_q, self.momentum)
        if self._pending_keys is None:
            return
        keys = D.concat_all_gather(self._pending_keys)
        self._pending_keys = None
        n = keys.shape[0]
        ptr = int(self.queue_ptr.item())
        if self.queue_size % n:
            raise UserError(
                f"MoCo queue size {self.queue_size} is not a multiple of the global batch {n}; "
                "pick --queue-size as a multiple of batch size x number of processes"
            )
        self.queue[:, ptr:ptr + n] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + n) % self.queue_size


def _batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle a batch across ranks (MoCo's shuffling BN); identity in one process."""
    if not D.is_distributed():
        return x, None
    x_all = D.concat_all_gather(x)
    n_all = x_all.shape[0]
    idx = torch.randperm(n_all, device=x.device)
    torch.distributed.broadcast(idx, src=0)
    unshuffle = torch.argsort(idx)
    per = x.shape[0]
    r = D.rank()
    return x_all[idx.view(D.world_size(), -1)[r]], unshuffle.view(D.world_size(), per)


def _batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    if unshuffle is None:
        return x
    x_all = D.concat_all_gather(x)
    return x_all[unshuffle[D.rank()]]


# ----------------------------------------------------------------------------------------- DINO
class DINOHead(nn.Module):
    """DINO's projection head: 3-layer MLP, L2-normalised bottleneck, weight-normed last layer."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class DINO(Method):
    """DINO (Caron et al. 2021): self-distillation with multi-crop, an EMA teacher and centring.

    Views: two global crops (seasons 1 and 2) and ``n_local`` local crops (season 3), as the
    SSL4EO-S12 season-aware DINO does. Paper defaults: out_dim 65,536, teacher temperature 0.04,
    student 0.1, centre momentum 0.9, teacher momentum 0.996 -> 1 (cosine), last layer frozen
    during the first epoch.
    """

    name = "dino"
    num_season_views = 3

    def __init__(self, spec: BackboneSpec, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9, momentum_teacher: float = 0.996,
                 freeze_last_layer_epochs: int = 1, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.student = create_backbone(spec, dynamic_img_size=True)
        fd = feature_dim(self.student)
        self.student_head = DINOHead(fd, out_dim, hidden_dim, bottleneck_dim,
                                     norm_last_layer=norm_last_layer)
        self.teacher = _freeze(copy.deepcopy(self.student))
        self.teacher_head = _freeze(DINOHead(fd, out_dim, hidden_dim, bottleneck_dim))
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.momentum_teacher = momentum_teacher
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self._pending_teacher: torch.Tensor | None = None

    @property
    def backbone(self) -> nn.Module:
        return self.student

    @property
    def exported(self) -> nn.Module:
        # the teacher, as DINO's own evaluation (eval_knn.py / eval_linear.py default to the
        # checkpoint's "teacher") and SSL4EO-S12's released DINO weights: an average of the
        # student over its last steps; on the one run of benchmarks/learning.py probed both
        # ways (seed 0) it was ahead of the student on all four probes (README "Does
        # pretraining learn?")
        return self.teacher

    def backbones(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    @staticmethod
    def _multicrop(backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
        """Run crops through backbone grouped by resolution (DINO's MultiCropWrapper)."""
        feats = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(backbone(torch.cat(crops[start:end])))
            start = end
        return head(torch.cat(feats))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        n_glob = 2
        batch = views[0].shape[0]
        with torch.no_grad():
            t_out = self._multicrop(self.teacher, self.teacher_head, views[:n_glob]).float()
            t_soft = F.softmax((t_out - self.center) / self.teacher_temp, dim=-1).chunk(n_glob)
        s_out = self._multicrop(self.student, self.student_head, views).float() / self.student_temp
        s_logp = F.log_softmax(s_out, dim=-1).chunk(len(views))
        total, n_terms = s_out.new_zeros(()), 0
        for iq, q in enumerate(t_soft):
            for v, lp in enumerate(s_logp):
                if v == iq:
                    continue
                total = total + torch.sum(-q * lp, dim=-1).mean()
                n_terms += 1
        self._pending_teacher = t_out.detach()
        assert t_out.shape[0] == n_glob * batch
        return total / n_terms

    def on_after_backward(self, epoch: int) -> None:
        if epoch >= self.freeze_last_layer_epochs:
            return
        for name, p in self.student_head.named_parameters():
            if "last_layer" in name:
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = 1 - (1 - self.momentum_teacher) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2
        ema_update(self.teacher, self.student, m)
        ema_update(self.teacher_head, self.student_head, m)
        if self._pending_teacher is None:
            return
        t = self._pending_teacher
        self._pending_teacher = None
        batch_center = D.all_reduce_sum(t.sum(dim=0, keepdim=True))
        batch_center = batch_center / (t.shape[0] * D.world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


# ------------------------------------------------------------------------------------------ MAE
class MAE(Method):
    """Masked autoencoder (He et al. 2022) on a timm ViT encoder.

    The encoder is the timm ViT itself (so its weights export 1:1); its position embedding is
    the fixed 2-D sine-cosine one, as in MAE. Paper setting: ViT-S/16, mask ratio 0.7,
    normalised-pixel loss, decoder 512-d x 8 blocks.
    """

    name = "mae"
    num_season_views = 1

    def __init__(self, spec: BackboneSpec, mask_ratio: float = 0.7, norm_pix_loss: bool = True,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if not spec.is_vit:
            raise UserError(f"MAE needs a ViT backbone (e.g. vit_small_patch16_224), got {spec.arch!r}")
        self.encoder = create_backbone(spec)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = spec.in_chans
        self.patch = vit_patch_size(self.encoder)
        grid = vit_grid(self.encoder)
        dim = self.encoder.embed_dim
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_pos_embed(dim, grid, cls_token=True))
        self.encoder.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid, cls_token=True))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch ** 2 * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def compile_targets(self) -> list[nn.Module]:
        # the encoder is driven piecewise (masking between embedding and blocks)
        return [self.encoder.blocks, *self.decoder_blocks]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]."""
        n, c, h, w = imgs.shape
        p = self.patch
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample.

        x: [N, L, D] -> (kept [N, L_keep, D], mask [N, L] with 1 = removed, ids_restore [N, L]).
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)  # small is keep, large is remove
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor):
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, self.mask_ratio)
        x = torch.cat([vit_cls_token(enc, x.shape[0]), x], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(x)))
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], masks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on removed patches. imgs [N,C,H,W]; pred [N,L,p*p*C]; mask [N,L] (1 = removed)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        imgs = views[0]
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs.float(), pred, mask)


# ------------------------------------------------------------------------------------- data2vec
class Data2Vec(Method):
    """data2vec (Baevski et al. 2022) for images on a timm ViT.

    The student sees the image with masked patches replaced by a learned mask token and
    regresses, at the masked positions, the average of the teacher's top-K block targets (each
    instance-normalised over tokens); the teacher is an EMA of the student with momentum
    0.999 -> 0.9998 (linear over training). Paper: ViT-S/16, 120 of 196 patches masked, target
    layers 6-11 (K = 6), masked BEiT's way (``masking="block"``, the default: rectangles of
    patches, :func:`block_mask`, until the share is reached; ``"random"``: patches drawn
    independently).
    The target of a block is its feed-forward output before its last residual connection, as
    in the paper (``target_layer="ffn"``; ``"block"``: the block's output, residual stream
    included). ``layer_norm_targets`` adds fairseq's parameter-less layer norm over features
    of the averaged target (instance norm per block -> average -> layer norm), which puts
    back, per token, the scale that the per-block instance norm over tokens leaves uneven
    across channels.
    """

    name = "data2vec"
    num_season_views = 1

    def __init__(self, spec: BackboneSpec, mask_fraction: float = 120 / 196, top_k: int = 6,
                 ema_start: float = 0.999, ema_end: float = 0.9998,
                 layer_norm_targets: bool = False, target_layer: str = "ffn",
                 masking: str = "block") -> None:
        super().__init__()
        if target_layer not in ("ffn", "block"):
            raise UserError(f"data2vec target_layer must be 'ffn' or 'block', got {target_layer!r}")
        if masking not in ("random", "block"):
            raise UserError(f"data2vec masking must be 'random' or 'block', got {masking!r}")
        if not spec.is_vit:
            raise UserError(f"data2vec needs a ViT backbone (e.g. vit_small_patch16_224), got {spec.arch!r}")
        self.student = create_backbone(spec)
        self.teacher = _freeze(copy.deepcopy(self.student))
        dim = self.student.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.regression_head = nn.Linear(dim, dim)
        self.mask_fraction = mask_fraction
        self.top_k = min(top_k, len(self.student.blocks))
        self.ema_start, self.ema_end = ema_start, ema_end
        self.layer_norm_targets = layer_norm_targets
        self.target_layer = target_layer
        self.masking = masking

    @property
    def backbone(self) -> nn.Module:
        return self.student

    def backbones(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    def compile_targets(self) -> list[nn.Module]:
        # student blocks run as one stack; the teacher's are read out one by one
        return [self.student.blocks, *self.teacher.blocks]

    def _mask(self, n: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        length = grid[0] * grid[1]
        num = max(1, round(length * self.mask_fraction))
        if self.masking == "block":
            return torch.stack([block_mask(grid, num) for _ in range(n)]).flatten(1).to(device)
        ids = torch.argsort(torch.rand(n, length, device=device), dim=1)[:, :num]
        mask = torch.zeros(n, length, dtype=torch.bool, device=device)
        mask.scatter_(1, ids, True)
        return mask

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        imgs = views[0]
        s = self.student
        tok = s.patch_embed(imgs)
        n = tok.shape[0]
        # the ViT's own grid: its position embedding (added below) is of that size
        mask = self._mask(n, vit_grid(s), tok.device)
        w = mask.unsqueeze(-1).to(tok.dtype)
        tok = tok * (1 - w) + self.mask_token.to(tok.dtype) * w
        x = torch.cat([vit_cls_token(s, n), tok + s.pos_embed[:, 1:]], dim=1)
        x = s.norm(s.blocks(s.norm_pre(x)))
        pred = self.regression_head(x[:, 1:][mask]).float()
        return F.mse_loss(pred, self.targets(imgs)[mask])

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The teacher's targets ``[B, L, D]`` for every patch of ``imgs``: its top-K block
        outputs, each instance-normalised over tokens, averaged (then layer-normalised over
        features with ``layer_norm_targets``)."""
        t = self.teacher
        n = imgs.shape[0]
        y = torch.cat([vit_cls_token(t, n), t.patch_embed(imgs) + t.pos_embed[:, 1:]], dim=1)
        y = t.norm_pre(y)
        outs = []
        for i, blk in enumerate(t.blocks):
            if i < len(t.blocks) - self.top_k:
                y = blk(y)
                continue
            if self.target_layer == "ffn":  # timm's Block.forward, its FFN output kept
                y = y + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(y))))
                out = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
                y = y + out
            else:
                y = out = blk(y)
            outs.append(F.instance_norm(out[:, 1:].float().transpose(1, 2)).transpose(1, 2))
        target = sum(outs) / len(outs)
        if self.layer_norm_targets:
            target = F.layer_norm(target, target.shape[-1:])
        return target

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        frac = min(1.0, step / max(total_steps, 1))
        m = self.ema_start + (self.ema_end - self.ema_start) * frac
        ema_update(self.teacher, self.student, m)


def block_mask(grid: tuple[int, int], num: int, min_share: float = 16 / 196,
               aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """BEiT's block-wise mask ``[H, W]`` (bool) of about ``num`` of the grid's patches, as
    data2vec masks images: rectangles of at least ``min_share`` of the grid (BEiT: 16 of
    196 patches) with an aspect ratio drawn log-uniformly in ``aspect``, each of an area drawn
    up to what is still to mask, added while a rectangle adds patches without overshooting
    (10 tries per rectangle); it may stop a few patches short of ``num``. Drawn with torch's
    generator, so that a seeded run masks alike."""
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    lo = max(1.0, min_share * h * w)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < num:
        left_to_mask = num - count
        added = 0
        for _ in range(10):
            u, v = torch.rand(2).tolist()
            area = lo + (left_to_mask - lo) * u  # between the smallest block and what is left
            ratio = math.exp(log_lo + (log_hi - log_lo) * v)
            bh = round(math.sqrt(area * ratio))
            bw = round(math.sqrt(area / ratio))
            if not (0 < bh < h and 0 < bw < w):
                continue
            top = int(torch.randint(0, h - bh + 1, ()))
            left = int(torch.randint(0, w - bw + 1, ()))
            block = mask[top:top + bh, left:left + bw]
            new = bh * bw - int(block.sum())
            if 0 < new <= left_to_mask:
                block[...] = True
                added = new
                break
        if not added:
            break
        count += added
    return mask


def build_method(method: str, spec: BackboneSpec, **kwargs: Any) -> Method:
    """Instantiate ``method`` on the backbone ``spec``; ``kwargs`` override paper defaults."""
    cls = {"moco": MoCo, "dino": DINO, "mae": MAE, "data2vec": Data2Vec}.get(method)
    if cls is None:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return cls(spec, **kwargs)
