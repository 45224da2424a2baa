"""``ssl4eo pretrain`` and ``ssl4eo probe``, and their programmatic twins for the demo.

``pretrain`` runs one of the four SSL4EO-S12 methods on a store written by ``ssl4eo build``, in
one process or under ``torchrun`` (DDP)::

    ssl4eo pretrain --method moco --store cube.zarr --out runs/moco
    torchrun --nproc_per_node 4 -m pipeline.cli pretrain --method mae --store cube.zarr

``probe`` linear-probes the exported ``backbone.safetensors`` on frozen features next to the
same backbone with random weights (EuroSAT-MS, or the demo catalog's land cover)::

    ssl4eo probe --weights runs/moco/backbone.safetensors --data ../shared/data/real/eurosat_ms_1pct

Defaults are the paper's (ResNet-50 / ViT-S/16, 224 px, batch 64 per process, 100 epochs);
``--size small`` switches to CPU-sized ones (:data:`SMALL`). For Python callers (the demo):
:func:`small_config` + :func:`pipeline.train.engine.pretrain`, :func:`pipeline.train.probe.probe`,
or both at once with :func:`pretrain_and_probe`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import TrainConfig

METHODS = ("moco", "dino", "mae", "data2vec")

#: CPU-sized settings (``--size small``, :func:`small_config`): small timm backbones, 64 px
#: crops, batch 8, short warmup and small heads/decoders. Explicit options still win.
SMALL: dict[str, Any] = {
    "arch": {"moco": "resnet18", "dino": "resnet18", "mae": "vit_tiny_patch16_224",
             "data2vec": "vit_tiny_patch16_224"},
    "crop_size": 64,
    "batch_size": 8,
    "epochs": 10,
    "warmup_epochs": 1.0,
    "n_local": 2,
    "num_workers": 0,
    "method_kwargs": {
        "moco": {"queue_size": 4096},
        "dino": {"out_dim": 4096, "hidden_dim": 512, "bottleneck_dim": 128},
        "mae": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
        "data2vec": {},
    },
}

#: Method-specific options: CLI dest -> (methods it applies to, constructor keyword per method).
_METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "queue_size": {"moco": "queue_size"},
    "moco_dim": {"moco": "dim"},
    "temperature": {"moco": "temperature"},
    "moco_momentum": {"moco": "momentum"},
    "bn_splits": {"moco": "bn_splits"},
    "out_dim": {"dino": "out_dim"},
    "teacher_temp": {"dino": "teacher_temp"},
    "teacher_momentum": {"dino": "momentum_teacher"},
    "mask_ratio": {"mae": "mask_ratio", "data2vec": "mask_fraction"},
    "decoder_dim": {"mae": "decoder_dim"},
    "decoder_depth": {"mae": "decoder_depth"},
    "norm_pix_loss": {"mae": "norm_pix_loss"},
    "top_k": {"data2vec": "top_k"},
    "ema_start": {"data2vec": "ema_start"},
    "ema_end": {"data2vec": "ema_end"},
    "layer_norm_targets": {"data2vec": "layer_norm_targets"},
    "target_layer": {"data2vec": "target_layer"},
    "masking": {"data2vec": "masking"},
}


# ---------------------------------------------------------------------------- python API
def small_config(method: str, store: str | None, out_dir: str, **overrides: Any) -> TrainConfig:
    """A :class:`~pipeline.train.engine.TrainConfig` with the CPU-sized settings of
    :data:`SMALL` for ``method``; keyword ``overrides`` set any other field (``method_kwargs``
    entries are merged with the small ones)."""
    from .engine import TrainConfig

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    kwargs = dict(SMALL["method_kwargs"][method])
    kwargs.update(overrides.pop("method_kwargs", None) or {})
    arch = overrides.pop("arch", None) or SMALL["arch"][method]
    fields = {k: SMALL[k] for k in ("crop_size", "batch_size", "epochs", "warmup_epochs",
                                     "n_local", "num_workers")}
    fields.update(overrides)
    return TrainConfig(method=method, store=store, out_dir=str(out_dir), arch=arch,
                       method_kwargs=kwargs, **fields)


def pretrain_and_probe(
    store: str,
    out_dir: str | Path,
    *,
    method: str = "moco",
    epochs: int = 5,
    data_dir: str | Path | None = None,
    catalog_dir: str | Path | None = None,
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """A CPU-sized pretraining on ``store`` (:func:`small_config`) followed by a linear probe
    of the exported backbone and of the same backbone with random weights.

    The probe uses EuroSAT-MS at ``data_dir`` (default: ``../shared/data/real/eurosat_ms_1pct``
    when present), else the land-cover task of the demo catalog at ``catalog_dir``. Returns
    ``{"pretrain": <engine summary>, "probe": <probe result>, "text": <printable lines>}``.
    """
    from .engine import pretrain
    from .probe import format_probe, probe

    cfg = small_config(method, str(store), str(out_dir), epochs=epochs, seed=seed,
                       progress=progress, **overrides)
    summary = pretrain(cfg)
    result = probe(summary["weights"], data_dir, catalog_dir=catalog_dir, folds=folds,
                   seed=seed, progress=progress)
    return {"pretrain": summary, "probe": result, "text": format_probe(result)}


# ---------------------------------------------------------------------------------- parsers
def add_commands(subparsers: Any) -> None:
    """``ssl4eo pretrain`` and ``ssl4eo probe``."""
    _add_pretrain(subparsers)
    _add_probe(subparsers)


def _add_pretrain(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain", help="self-supervised pretraining (MoCo-v2, DINO, MAE, data2vec) on a store",
        description=(
            "Pretrain a timm backbone on a store written by `ssl4eo build`, with the paper's\n"
            "hyper-parameters by default (SSL4EO-S12: MoCo-v2 ResNet-50; DINO ResNet-50 or\n"
            "ViT-S/16; MAE ViT-S/16; data2vec ViT-S/16; 224 px crops, batch 64 per process,\n"
            "100 epochs). Two views of a location come from independently drawn seasons.\n"
            "Writes OUT/checkpoint.pt after every epoch (a re-run resumes from it),\n"
            "OUT/log.jsonl, and OUT/backbone.safetensors (timm loads it strictly).\n\n"
            "Several GPUs (--batch-size is per process):\n"
            "  torchrun --nproc_per_node N -m pipeline.cli pretrain --method moco --store S"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--method", "-m", required=True, choices=METHODS,
                   help="pretraining method")
    g.add_argument("--store", required=True,
                   help="Zarr store written by `ssl4eo build` (local path or s3://, az://, "
                   "gs://, https:// URL)")
    g.add_argument("--modalities", nargs="+", default=["S2L2A"], metavar="GROUP",
                   help="modality groups stacked as input channels (default: S2L2A)")
    g.add_argument("--out", "-o", default=None,
                   help="output directory for checkpoint, log and weights (default: runs/METHOD)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per training process (default 4; 0 in "
                   "--size small)")
    m = p.add_argument_group("model and schedule (defaults: the paper's for the method)")
    m.add_argument("--size", choices=("paper", "small"), default="paper",
                   help="paper: ResNet-50/ViT-S/16 at 224 px, batch 64, 100 epochs; small: "
                   "resnet18/vit_tiny at 64 px, batch 8, 10 epochs and small heads (CPU)")
    m.add_argument("--arch", default=None,
                   help="timm backbone name (resnet50, resnet18, vit_small_patch16_224, "
                   "vit_tiny_patch16_224, ...)")
    m.add_argument("--crop-size", type=int, default=None,
                   help="training crop size in pixels (default 224; 64 in --size small)")
    m.add_argument("--patch-size", type=int, default=None,
                   help="ViT patch size in pixels (default: the architecture's, 16 for "
                   "vit_*_patch16_*; 8 gives 64 tokens at 64 px crops, where 16 leaves 16). "
                   "Recorded in the exported weights")
    m.add_argument("--epochs", type=int, default=None, help="total epochs of the schedule")
    m.add_argument("--batch-size", "-b", type=int, default=None,
                   help="batch size per process (default 64; 8 in --size small)")
    m.add_argument("--lr", type=float, default=None,
                   help="learning rate (MAE, DINO: base lr, scaled by global batch / 256)")
    m.add_argument("--min-lr", type=float, default=0.0,
                   help="final learning rate of the cosine schedule")
    m.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    m.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear learning-rate warmup, in epochs")
    m.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="optimizer (default: sgd for ResNets, adamw for ViTs, as the paper)")
    m.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm to this value (0: off)")
    m.add_argument("--max-steps-per-epoch", type=int, default=None,
                   help="cap the steps of every epoch (quick trials)")
    m.add_argument("--repeats", type=int, default=1,
                   help="passes over the store per epoch, each with new season draws and "
                   "augmentations (a small store: longer epochs, fewer checkpoints)")
    mo = p.add_argument_group("method options (each applies to the methods named)")
    mo.add_argument("--queue-size", type=int, default=None,
                    help="moco: negatives in the queue (65536); a multiple of the global batch")
    mo.add_argument("--moco-dim", type=int, default=None, help="moco: embedding size (128)")
    mo.add_argument("--temperature", type=float, default=None,
                    help="moco: softmax temperature (0.2)")
    mo.add_argument("--moco-momentum", type=float, default=None,
                    help="moco: key-encoder momentum (0.999)")
    mo.add_argument("--bn-splits", type=int, default=None,
                    help="moco, one process: BatchNorm groups of the batch, keys shuffled "
                    "across them so BN statistics cannot pair query and key (4; 1: off; "
                    "DDP shuffles across ranks instead)")
    mo.add_argument("--out-dim", type=int, default=None, help="dino: head output size (65536)")
    mo.add_argument("--teacher-temp", type=float, default=None,
                    help="dino: teacher temperature (0.04)")
    mo.add_argument("--teacher-momentum", type=float, default=None,
                    help="dino: teacher EMA momentum at the start, cosine to 1 (0.996)")
    mo.add_argument("--n-local", type=int, default=None,
                    help="dino: local crops per location (8; 2 in --size small)")
    mo.add_argument("--local-size", type=int, default=None,
                    help="dino: local crop size (default 96/224 of --crop-size)")
    mo.add_argument("--mask-ratio", type=float, default=None,
                    help="mae: share of patches masked (0.7); data2vec: (120/196)")
    mo.add_argument("--decoder-dim", type=int, default=None, help="mae: decoder width (512)")
    mo.add_argument("--decoder-depth", type=int, default=None, help="mae: decoder blocks (8)")
    mo.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                    default=None, help="mae: regress raw instead of per-patch normalised pixels")
    mo.add_argument("--top-k", type=int, default=None,
                    help="data2vec: teacher blocks averaged into the target (6)")
    mo.add_argument("--ema-start", type=float, default=None,
                    help="data2vec: teacher EMA at the start (0.999)")
    mo.add_argument("--ema-end", type=float, default=None,
                    help="data2vec: teacher EMA at the end (0.9998)")
    mo.add_argument("--layer-norm-targets", action="store_true", default=None,
                    help="data2vec: layer-normalise the averaged target over its features "
                    "(after each block's instance norm over tokens; off by default)")
    mo.add_argument("--target-layer", choices=("ffn", "block"), default=None,
                    help="data2vec: what of each target block the teacher regresses: ffn (the "
                    "paper's: its feed-forward output before the last residual connection; "
                    "default) or block (the block's output)")
    mo.add_argument("--masking", choices=("block", "random"), default=None,
                    help="data2vec: which patches are masked: block (the paper's, BEiT's "
                    "rectangles of patches; default) or random (each patch independently)")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available")
    r.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast precision (auto: bf16 on CUDA, fp32 on CPU)")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CNNs on CUDA)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders (checkpoints and weights are unchanged)")
    r.add_argument("--seed", type=int, default=42, help="seed of weights, data order and views")
    r.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue from OUT/checkpoint.pt when present; none: start over "
                   "(the checkpoint is overwritten); or a checkpoint file")
    r.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="run at most this many epochs now, then stop (resume later)")
    r.add_argument("--log-every", type=int, default=10,
                   help="write a step record to log.jsonl every N steps (0: epochs only)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=_cmd_pretrain)


def _add_probe(subparsers: Any) -> None:
    q = subparsers.add_parser(
        "probe", help="linear probe of pretrained weights vs. random weights on frozen features",
        description=(
            "Logistic regression on frozen, globally pooled features of the backbone in "
            "--weights and of the same architecture with random weights, with stratified "
            "k-fold cross-validation over all images of EuroSAT-MS (13-band 64x64 GeoTIFFs in "
            "train|test/<Class>/*.tif). Bands are matched by name (EuroSAT's B10 is dropped "
            "for S2L2A weights) and standardised with the pretraining statistics stored in the "
            "weights. Without EuroSAT-MS, --catalog DIR probes the land cover of the demo "
            "catalog's synthetic scenes instead (and says so)."
        ),
    )
    q.add_argument("--weights", "-w", default=None,
                   help="backbone.safetensors written by `ssl4eo pretrain` (omit to probe only "
                   "a random --arch)")
    q.add_argument("--data", "-d", default=None,
                   help="EuroSAT-MS folder (default: ../shared/data/real/eurosat_ms_1pct or "
                   "$SSL4EO_REAL_DATA/eurosat_ms_1pct when present); a demo catalog folder "
                   "also works")
    q.add_argument("--catalog", default=None,
                   help="demo catalog folder (with labels/) for the synthetic land-cover task "
                   "when no EuroSAT-MS is found")
    q.add_argument("--arch", default=None,
                   help="timm backbone name; needed without --weights, checked against them")
    q.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of the folds and of the random-weights baseline")
    q.add_argument("--image-size", type=int, default=None,
                   help="resize images to this size (default: the pretraining crop size)")
    q.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch size")
    q.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available")
    q.add_argument("--l2", type=float, default=None,
                   help="L2 strength of the logistic regression (default: chosen per fold by "
                   "inner 3-fold CV)")
    q.add_argument("--out", "-o", default=None, help="also write the result as JSON here")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=_cmd_probe)


# --------------------------------------------------------------------------------- commands
def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~pipeline.train.engine.TrainConfig` an ``ssl4eo pretrain`` line asks for."""
    from .engine import TrainConfig

    method = args.method
    method_kwargs: dict[str, Any] = {}
    for dest, per_method in _METHOD_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if method not in per_method:
            flag = "--no-norm-pix-loss" if dest == "norm_pix_loss" else "--" + dest.replace(
                "_", "-")
            raise UserError(f"{flag} applies to {' and '.join(per_method)} only; drop it for "
                            f"--method {method}")
        method_kwargs[per_method[method]] = value
    if method != "dino" and (args.n_local is not None or args.local_size is not None):
        raise UserError(f"--n-local/--local-size apply to dino only; drop them for --method "
                        f"{method}")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--crop-size", args.crop_size), ("--patch-size", args.patch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give a positive number")
    resume: str | None = args.resume
    if resume is not None and resume.lower() == "none":
        resume = None
    fields: dict[str, Any] = {
        "out_dir": args.out or str(Path("runs") / method),
        "modalities": tuple(args.modalities),
        "min_lr": args.min_lr,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "optimizer": args.optimizer,
        "clip_grad": args.clip_grad,
        "device": args.device,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "seed": args.seed,
        "log_every": args.log_every,
        "resume": resume,
        "stop_after": args.stop_after,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "repeats": args.repeats,
        "local_size": args.local_size,
        "progress": not args.no_progress,
    }
    optional = {"arch": args.arch, "crop_size": args.crop_size, "patch_size": args.patch_size,
                "epochs": args.epochs,
                "batch_size": args.batch_size, "warmup_epochs": args.warmup_epochs,
                "n_local": args.n_local, "num_workers": args.workers}
    if args.size == "small":
        fields.update({k: v for k, v in optional.items() if v is not None})
        return small_config(method, args.store, fields.pop("out_dir"),
                            method_kwargs=method_kwargs, **fields)
    fields.update({k: v for k, v in optional.items() if v is not None})
    return TrainConfig(method=method, store=args.store, method_kwargs=method_kwargs, **fields)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from . import dist as D
    from .engine import pretrain

    cfg = config_from_args(args)
    try:
        summary = pretrain(cfg)
        main = D.is_main()
    finally:
        D.cleanup()
    if not main:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    hist = summary["history"]
    for h in hist:
        print(f"epoch {h['epoch']}: loss {h['loss']:.4f}, {h['images_per_s']:.1f} images/s, "
              f"{h['time_s']:.1f} s")
    if not hist:
        print(f"nothing to do: {summary['epochs']} of {cfg.epochs} epochs already done "
              f"(checkpoint {summary['checkpoint']})")
    print(f"{summary['method']} ({summary['arch']}): {summary['epochs']} epochs, "
          f"{summary['steps']} steps on {summary['world_size']} process(es), "
          f"{summary['device']}, global batch {summary['global_batch']}, "
          f"lr {summary['base_lr']:.3g}")
    print(f"weights: {summary['weights']}")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from .probe import format_probe, probe

    result = probe(args.weights, args.data, arch=args.arch, catalog_dir=args.catalog,
                   folds=args.folds, seed=args.seed, image_size=args.image_size,
                   batch_size=args.batch_size, device=args.device, l2=args.l2,
                   progress=not args.no_progress)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(format_probe(result))
    return 0
