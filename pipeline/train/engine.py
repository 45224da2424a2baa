"""Training engine: one loop for the four methods, single process or DDP under torchrun.

Anatomy follows MAE's ``main_pretrain.py`` / ``engine_pretrain.py``: a config (here a
dataclass that the CLI fills), :func:`pretrain` (set-up, resume, epochs, checkpoints, export)
and :func:`train_one_epoch` (per-iteration LR, autocast, non-finite check, optimizer step and
the method's EMA/queue/centre update).

* Devices: CUDA with bf16 autocast and channels_last (ResNets) by default; CPU in fp32.
  ``compile=True`` compiles the method's :meth:`~pipeline.train.methods.Method.compile_targets`
  in place (``nn.Module.compile``: parameter names are unchanged, so checkpoints and exports
  are the same either way).
* DDP: launched by ``torchrun``; process group from the environment (NCCL on GPU, Gloo on
  CPU); ``--batch-size`` is per process; rank 0 writes checkpoints and logs.
* Schedule: linear warmup then half-cycle cosine to ``min_lr``, set every iteration.
* Checkpoint after every epoch (``checkpoint.pt``, written atomically): method state (teacher,
  queue, centre included), optimizer, grad scaler, step, epoch and every rank's RNG states;
  ``resume="auto"`` continues from it exactly (data order and augmentations are functions of
  seed, epoch and sample index).
* Log: ``log.jsonl`` (one JSON object per line) from rank 0.
* A non-finite loss stops the run with :class:`NonFiniteLossError` (before the bad update).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from . import dist as D
from .augment import recipe, split_views
from .backbones import BackboneSpec, is_vit
from .export import export_backbone
from .methods import Method, build_method, method_defaults

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "backbone.safetensors"
LOG = "log.jsonl"


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stopped before applying the update."""


@dataclass
class TrainConfig:
    """Everything a pretraining run needs. ``None`` means: the method's paper default."""

    method: str
    store: str | None = None
    out_dir: str = "runs/pretrain"
    arch: str | None = None
    crop_size: int = 224
    patch_size: int | None = None  # ViT patch size; None: the architecture name's
    epochs: int = 100
    batch_size: int = 64  # per process
    lr: float | None = None  # MAE, DINO: base lr, scaled by global batch / 256
    min_lr: float = 0.0
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    optimizer: str | None = None
    clip_grad: float | None = None
    modalities: tuple[str, ...] = ("S2L2A",)
    num_workers: int = 4
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or bf16 / fp16 / fp32
    channels_last: bool | None = None  # None: on for CNNs on CUDA
    compile: bool = False
    seed: int = 42
    log_every: int = 10
    resume: str | None = "auto"  # "auto": out_dir/checkpoint.pt if present; a path; None
    stop_after: int | None = None  # epochs to run in this invocation (pre-emptible jobs)
    max_steps_per_epoch: int | None = None  # cap for demos and tests
    repeats: int = 1  # passes over the store per epoch (RepeatDataset; small stores)
    n_local: int = 8  # DINO local crops
    local_size: int | None = None  # DINO local crop size (default 96/224 of crop_size)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the paper defaults filled in for ``None`` fields."""
        d = method_defaults(self.method, self.arch)
        c = TrainConfig(**asdict(self))
        c.modalities = tuple(self.modalities)
        c.arch = self.arch or d.arch
        c.lr = d.lr if self.lr is None else self.lr
        c.weight_decay = d.weight_decay if self.weight_decay is None else self.weight_decay
        c.warmup_epochs = d.warmup_epochs if self.warmup_epochs is None else self.warmup_epochs
        c.optimizer = self.optimizer or d.optimizer
        c.clip_grad = d.clip_grad if self.clip_grad is None else self.clip_grad
        if c.patch_size is not None:
            if not is_vit(c.arch):
                raise UserError(f"--patch-size applies to ViT backbones; drop it for {c.arch}")
            if c.crop_size % c.patch_size:
                raise UserError(f"--crop-size {c.crop_size} is not a multiple of --patch-size "
                                f"{c.patch_size}; pick sizes that tile the crop")
        return c


# ----------------------------------------------------------------------------------- helpers
def backbone_spec(cfg: TrainConfig, in_chans: int) -> BackboneSpec:
    """The backbone ``cfg`` trains: a ViT is built for the crop size (and ``patch_size``)."""
    vit = is_vit(cfg.arch)
    return BackboneSpec(cfg.arch, in_chans, cfg.crop_size if vit else None,
                        cfg.patch_size if vit else None)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup to ``base_lr`` then half-cycle cosine to ``min_lr`` (per iteration)."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states in tensors and plain types (``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, wd on all weights, MoCo/DINO-RN50) or AdamW (no wd on 1-D params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name else decay).append(p)
        betas = (0.9, 0.95) if cfg.method == "mae" else (0.9, 0.999)
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    raise UserError(f"optimizer {cfg.optimizer!r} is not supported; use sgd or adamw")


def build_dataset(cfg: TrainConfig) -> Any:
    """The store through :class:`pipeline.loader.ZarrPatchDataset` with the method's views."""
    from ..loader import ZarrPatchDataset
    from .methods import DINO, MAE, Data2Vec, MoCo

    if not cfg.store:
        raise UserError("no store given: pass --store PATH_OR_URL (a store written by `ssl4eo build`)")
    views = {"moco": MoCo, "dino": DINO, "mae": MAE, "data2vec": Data2Vec}[cfg.method].num_season_views
    transforms = recipe(cfg.method, cfg.crop_size, local_size=cfg.local_size, n_local=cfg.n_local)
    if views == 1:
        ds = ZarrPatchDataset(cfg.store, modalities=cfg.modalities, seasons="random",
                              normalize=True, transform=transforms[0], seed=cfg.seed,
                              return_metadata=False)
    else:
        ds = ZarrPatchDataset(cfg.store, modalities=cfg.modalities, seasons="augment",
                              num_views=views, normalize=True, transform=transforms,
                              seed=cfg.seed, return_metadata=False)
    return RepeatDataset(ds, cfg.repeats) if cfg.repeats > 1 else ds


class RepeatDataset:
    """``repeats`` passes over ``dataset`` per epoch, each pass with its own season draws and
    augmentations: item ``k`` is ``dataset[k % n]`` drawn at the inner epoch
    ``epoch * repeats + k // n``. A small store (the demo's 25-60 locations make 3-7 batches)
    then gives epochs long enough for a learning-rate schedule, with one checkpoint each
    instead of one every few steps. Draws stay functions of (seed, epoch, index), so resume
    is still exact. Other attributes (``num_bands``, ``band_names``, ...) are the dataset's.
    """

    def __init__(self, dataset: Any, repeats: int) -> None:
        if repeats < 1:
            raise UserError(f"repeats {repeats}: give a positive number of passes per epoch")
        self.dataset, self.repeats, self.epoch = dataset, int(repeats), 0

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, k: int) -> Any:
        n = len(self.dataset)
        if not 0 <= k < n * self.repeats:
            raise IndexError(f"index {k} out of range for {n * self.repeats} items")
        self.dataset.set_epoch(self.epoch * self.repeats + k // n)
        return self.dataset[k % n]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_loader(dataset: Any, cfg: TrainConfig, device: torch.device, sampler: Any,
                 persistent: bool = False) -> Any:
    """The training ``DataLoader``: ``cfg.batch_size`` per process, whole batches only, workers
    started with forkserver (zarr's I/O threads make fork unsafe), pinned memory on CUDA."""
    from torch.utils.data import DataLoader

    kw: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kw = {"multiprocessing_context": "forkserver", "persistent_workers": persistent,
              "prefetch_factor": 4}
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=cfg.num_workers, drop_last=True,
                      pin_memory=device.type == "cuda", **kw)


def input_metadata(dataset: Any, modalities: tuple[str, ...]) -> dict[str, Any]:
    """What a user of the weights needs to prepare inputs: band names in channel order, the
    normalisation (per-band mean/std, modalities concatenated) and the S2 DN offset of the
    store's convention (``s2_offset``: DN = 10000 x reflectance + offset)."""
    from .. import layout

    meta: dict[str, Any] = {}
    if hasattr(dataset, "band_names"):
        meta["band_names"] = list(dataset.band_names)
    norm = getattr(dataset, "_norm", None)
    if norm and all(m in norm for m in modalities):
        meta["norm_mean"] = np.concatenate(
            [np.asarray(norm[m][0], dtype=np.float64).reshape(-1) for m in modalities]).tolist()
        meta["norm_std"] = np.concatenate(
            [1.0 / np.asarray(norm[m][1], dtype=np.float64).reshape(-1) for m in modalities]
        ).tolist()
    url = getattr(dataset, "url", None)
    if url is not None and any(m.startswith("S2") for m in modalities):
        from ..loader import _open_root

        try:
            attrs = dict(_open_root(url, getattr(dataset, "storage_options", None)).attrs)
        except Exception:  # noqa: BLE001 - metadata only; the store was readable for training
            attrs = {}
        # by the recorded name (the offset follows from it)
        meta["s2_convention"], meta["s2_offset"] = layout.recorded_convention(attrs)
    return meta


def batch_views(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The list of view batches in an item batch (``views`` or a single ``image``)."""
    if "views" in batch:
        return split_views(list(batch["views"]))
    return [batch["image"]]


class JsonLog:
    """Append-only JSON-lines log; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    model: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    epoch: int = 0  # next epoch to run


def save_checkpoint(path: Path, st: TrainState, cfg: TrainConfig) -> None:
    """Rank 0 writes ``path`` atomically; every rank contributes its RNG states."""
    states = [rng_state()]
    if D.is_distributed():
        gathered: list[Any] = [None] * D.world_size()
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    if not D.is_main():
        return
    ckpt = {
        "model": st.model.state_dict(),
        "optimizer": st.optimizer.state_dict(),
        "scaler": st.scaler.state_dict(),
        "step": st.step,
        "epoch": st.epoch,
        "world_size": D.world_size(),
        "rng": states,
        "config": json.dumps(asdict(cfg)),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, st: TrainState) -> None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read checkpoint {str(path)!r} ({exc}); delete it to start over "
                        "or pass --resume with another file") from exc
    try:
        st.model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {str(path)!r} does not fit this model (different method, "
                        f"backbone or sizes): {str(exc)[:300]}; use another --out or --resume") from exc
    st.optimizer.load_state_dict(ckpt["optimizer"])
    st.scaler.load_state_dict(ckpt["scaler"])
    st.step, st.epoch = int(ckpt["step"]), int(ckpt["epoch"])
    rngs = ckpt["rng"]
    if len(rngs) == D.world_size():
        set_rng_state(rngs[D.rank()])
    else:
        log.warning("checkpoint was written by %d processes, now %d: RNG states not restored",
                    len(rngs), D.world_size())


# -------------------------------------------------------------------------------------- loop
def train_one_epoch(st: TrainState, ddp_model: nn.Module, loader: Any, epoch: int,
                    steps_per_epoch: int, total_steps: int, warmup_steps: int, base_lr: float,
                    cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None,
                    jlog: JsonLog) -> dict[str, float]:
    """One epoch; returns mean loss, images/s and the step losses."""
    model = st.model
    model.train()
    channels_last = bool(cfg.channels_last)
    losses: list[float] = []
    n_images = 0
    t0 = time.perf_counter()
    it = iter(loader)
    bar = None
    if cfg.progress and D.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_per_epoch, desc=f"{cfg.method} epoch {epoch}", leave=False)
    for _ in range(steps_per_epoch):
        batch = next(it)
        views = [v.to(device, non_blocking=True) for v in batch_views(batch)]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        lr = lr_at(st.step, total_steps, warmup_steps, base_lr, cfg.min_lr)
        for group in st.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            loss = ddp_model(views)
        loss_value = D.all_reduce_mean(loss.item(), device)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"{cfg.method} ({cfg.arch}): loss is {loss_value} at epoch {epoch}, step "
                f"{st.step} (lr {lr:.3g}); stopped before applying the update. Lower --lr, "
                f"use --precision fp32, check the store's band statistics (inputs should be "
                f"normalised), or resume from the last checkpoint in {cfg.out_dir}"
            )
        st.optimizer.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()
        model.on_after_backward(epoch)
        if cfg.clip_grad:
            st.scaler.unscale_(st.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           cfg.clip_grad)
        st.scaler.step(st.optimizer)
        st.scaler.update()
        st.step += 1
        model.after_step(st.step, total_steps)
        losses.append(loss_value)
        n_images += views[0].shape[0] * D.world_size()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if cfg.log_every and st.step % cfg.log_every == 0:
            jlog.write(type="step", epoch=epoch, step=st.step, loss=loss_value, lr=lr)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"loss": float(np.mean(losses)) if losses else float("nan"),
            "images_per_s": n_images / dt if dt > 0 else float("nan"), "time_s": dt,
            "losses": losses}


def configure_cuda(device: torch.device) -> None:
    """On CUDA: cuDNN autotuning (fixed crop sizes) and TF32 for the float32 matmuls left
    outside autocast, as the reference training scripts do. No-op elsewhere."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup_model(cfg: TrainConfig, in_chans: int, device: torch.device) -> Method:
    spec = backbone_spec(cfg, in_chans)
    model = build_method(cfg.method, spec, **cfg.method_kwargs)
    if D.is_distributed() and device.type == "cuda" and not is_vit(cfg.arch):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for module in model.compile_targets():
            module.compile()
    return model


def pretrain(cfg: TrainConfig, dataset: Any | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; return a summary dict (rank 0 also writes files).

    ``dataset`` overrides the store (any map-style dataset yielding ``views``/``image`` dicts,
    with ``num_bands`` and optionally ``band_names`` and ``set_epoch``).
    """
    from torch.utils.data import DistributedSampler

    cfg = cfg.resolved()
    device = D.init_distributed(cfg.device)
    configure_cuda(device)
    if cfg.channels_last is None:
        cfg.channels_last = device.type == "cuda" and not is_vit(cfg.arch)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(precision, "bad")
    if amp_dtype == "bad":
        raise UserError(f"--precision {precision!r}: use auto, bf16, fp16 or fp32")
    seed_everything(cfg.seed + D.rank())
    out = Path(cfg.out_dir)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = build_dataset(cfg)
    in_chans = int(dataset.num_bands)
    world = D.world_size()
    if len(dataset) < cfg.batch_size * world:
        raise UserError(f"the dataset has {len(dataset)} samples, fewer than one global batch "
                        f"({cfg.batch_size} x {world} processes); lower --batch-size")
    model = setup_model(cfg, in_chans, device)
    global_batch = cfg.batch_size * world
    queue = getattr(model, "queue_size", None)
    if queue is not None and queue % global_batch:
        raise UserError(
            f"MoCo queue size {queue} is not a multiple of the global batch {global_batch} "
            f"({cfg.batch_size} x {world} processes); pick --queue-size as a multiple of it")
    base_lr = cfg.lr * global_batch / 256 if method_defaults(cfg.method, cfg.arch).lr_scaling == "linear" else cfg.lr
    log.info("%s on %s: global batch %d (%d x %d processes), lr %.3g, %s, %s", cfg.method,
             cfg.arch, global_batch, cfg.batch_size, world, base_lr, device, precision)
    optimizer = build_optimizer(model, cfg, base_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    st = TrainState(model, optimizer, scaler)
    ckpt_path = out / CHECKPOINT
    resume = cfg.resume
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.is_file() else None
    if resume:
        if not Path(resume).is_file():
            raise UserError(f"--resume {resume!r}: no such checkpoint file")
        load_checkpoint(Path(resume), st)
    ddp_model: nn.Module = model
    if D.is_distributed():
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=D.rank(), shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = build_loader(dataset, cfg, device, sampler)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    jlog = JsonLog(out / LOG, D.is_main())
    if st.step == 0:
        jlog.write(type="start", config=asdict(cfg), world_size=world, global_batch=global_batch,
                   base_lr=base_lr, in_chans=in_chans, steps_per_epoch=steps_per_epoch,
                   device=str(device), precision=precision)
    else:
        jlog.write(type="resume", epoch=st.epoch, step=st.step, checkpoint=resume)
    history: list[dict[str, Any]] = []
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, st.epoch + cfg.stop_after)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while st.epoch < last_epoch:
        epoch = st.epoch
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        stats = train_one_epoch(st, ddp_model, loader, epoch, steps_per_epoch, total_steps,
                                warmup_steps, base_lr, cfg, device, amp_dtype, jlog)
        st.epoch = epoch + 1
        save_checkpoint(ckpt_path, st, cfg)
        record = {"epoch": epoch, "loss": stats["loss"], "images_per_s": stats["images_per_s"],
                  "time_s": stats["time_s"], "step": st.step}
        if device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        jlog.write(type="epoch", **record, losses=stats["losses"])
        history.append({**record, "losses": stats["losses"]})
    weights = out / WEIGHTS
    spec = backbone_spec(cfg, in_chans)
    if D.is_main():
        meta: dict[str, Any] = {"method": cfg.method, "epochs_done": st.epoch, "step": st.step,
                                "crop_size": cfg.crop_size}
        meta.update(input_metadata(dataset, cfg.modalities))
        export_backbone(model.exported, weights, spec, **meta)
    summary = {"method": cfg.method, "arch": cfg.arch, "epochs": st.epoch, "steps": st.step,
               "world_size": world, "global_batch": global_batch, "base_lr": base_lr,
               "history": history, "weights": str(weights), "checkpoint": str(ckpt_path),
               "device": str(device)}
    return summary
