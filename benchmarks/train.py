"""Pretraining throughput and memory per method: data from the store vs. synthetic tensors.

Usage (GPU, the paper's sizes: ResNet-50 / ViT-S/16, 224 px crops of 264 px patches, 13 bands,
batch 64 per GPU)::

    python benchmarks/train.py

CPU, small (what the tests can afford)::

    python benchmarks/train.py --arch resnet18 --vit-arch vit_tiny_patch16_224 \\
        --batch-size 8 --steps 3 --warmup 1 --crop-size 64 --patch-size 64 --n-local 2

Prints one JSON object per run (method x backbone) on stdout, as each finishes. For each run
the same model and optimizer take ``--warmup`` untimed steps, then ``--steps`` timed steps of
the engine's own :func:`pipeline.train.engine.train_one_epoch` (per-iteration LR, autocast,
non-finite check, optimizer step, EMA/queue/centre updates), fed

* ``store``: from a Zarr store through :class:`pipeline.loader.ZarrPatchDataset` and the
  engine's DataLoader (``--workers`` processes, the method's seasonal views and augmentations);
* ``synthetic``: one batch of the same structure, already on the device, served again and
  again (compute only).

Reported per mode: ``images_per_s`` (locations per second; MoCo runs 2 views per location, DINO
2 global + ``n_local`` local crops), ``step_ms``, ``peak_mem_gib`` (``torch.cuda.
max_memory_allocated``; ``null`` on CPU, where ``peak_rss_gib`` of the process is given), and
the first/last loss, and the loader stall: ``loader_wait_s``, the seconds the loop waited
for a batch, and ``stall_fraction``, their share of the timed steps (0: the loader keeps
the device busy). ``store_vs_synthetic`` = store / synthetic images per second (1.0: the
loader keeps up), ``loader_overhead_pct`` = (1 - that) x 100.

Without ``--store``, a store of ``--store-samples`` locations x 4 seasons x 13 bands (S2L1C, as
the paper) x ``--patch-size`` px is written to a temporary folder by the test-store writer
(``tests/store_fixtures.py``) and given random texture, so that it compresses like real data.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CNN_METHODS = ("moco", "dino")
VIT_METHODS = ("dino", "mae", "data2vec")


class _Continuing:
    """An iterable whose ``iter()`` resumes one underlying iterator (no worker restarts)."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator

    def __iter__(self) -> Any:
        return self.iterator


class _TimedNext:
    """Wraps an iterator and adds up the seconds spent waiting in ``next()``: the loader stall.

    The engine reads ``loss.item()`` every step, which waits for the device, so when the loop
    asks for the next batch the device is idle: time spent in ``next()`` is time the device
    waits for data."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator
        self.wait_s = 0.0

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.wait_s += time.perf_counter() - t0


class _Repeat:
    """Yields the same (device-resident) batch forever."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self) -> Any:
        while True:
            yield self.batch


def write_textured_store(path: Path, n: int, modality: str, size: int, seed: int = 0) -> Path:
    """A store in the real layout with random texture (uint16 DN around the band means)."""
    sys.path.insert(0, str(REPO / "tests"))
    import zarr
    from store_fixtures import write_store

    from pipeline import layout

    shard = 64
    write_store(path, n, (modality,), size=size, shard_samples=shard)
    arr = zarr.open_group(str(path), mode="a")[f"{modality}/bands"]
    rng = np.random.default_rng(seed)
    nb = arr.shape[2]
    for s0 in range(0, n, shard):
        s1 = min(n, s0 + shard)
        base = 1200 + 300 * rng.random((s1 - s0, layout.NUM_SEASONS, nb, 1, 1))
        noise = rng.normal(0, 400, size=(s1 - s0, layout.NUM_SEASONS, nb, size, size))
        arr[s0:s1] = np.clip(base + noise, 1, 12000).astype(np.uint16)
    return path


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _to_device(batch: Any, device: Any) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def run_one(method: str, arch: str, args: argparse.Namespace, store: str) -> dict[str, Any]:
    import torch
    from torch.utils.data import RandomSampler

    from pipeline.train import dist as D
    from pipeline.train.backbones import is_vit
    from pipeline.train.engine import (
        JsonLog,
        TrainConfig,
        TrainState,
        build_dataset,
        build_loader,
        build_optimizer,
        configure_cuda,
        seed_everything,
        setup_model,
        train_one_epoch,
    )
    from pipeline.train.methods import method_defaults

    cfg = TrainConfig(
        method=method, store=store, arch=arch, crop_size=args.crop_size,
        batch_size=args.batch_size, num_workers=args.workers, device=args.device,
        precision=args.precision, compile=args.compile, modalities=(args.modality,),
        n_local=args.n_local, progress=False, log_every=0, seed=args.seed,
    ).resolved()
    device = D.init_distributed(cfg.device)
    configure_cuda(device)
    if cfg.channels_last is None:
        cfg.channels_last = device.type == "cuda" and not is_vit(cfg.arch)
    precision = cfg.precision if cfg.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    seed_everything(cfg.seed)
    dataset = build_dataset(cfg)
    model = setup_model(cfg, dataset.num_bands, device)
    lr = cfg.lr * cfg.batch_size / 256 if method_defaults(method, arch).lr_scaling == "linear" \
        else cfg.lr
    optimizer = build_optimizer(model, cfg, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    st = TrainState(model, optimizer, scaler)
    total = args.warmup + args.steps
    sampler = RandomSampler(dataset, replacement=True, num_samples=cfg.batch_size * (total + 1),
                            generator=torch.Generator().manual_seed(cfg.seed))
    loader = build_loader(dataset, cfg, device, sampler, persistent=True)
    jlog = JsonLog(Path(os.devnull), False)
    big = 10 * total  # schedule length: the lr stays near its peak

    def timed(source: Any) -> dict[str, Any]:
        if args.warmup:
            train_one_epoch(st, model, source, 0, args.warmup, big, 0, lr, cfg, device,
                            amp_dtype, jlog)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        waits = _TimedNext(iter(source))
        stats = train_one_epoch(st, model, _Continuing(waits), 0, args.steps, big, 0, lr, cfg,
                                device, amp_dtype, jlog)
        out = {
            "loader_wait_s": waits.wait_s,
            "stall_fraction": waits.wait_s / stats["time_s"] if stats["time_s"] else None,
            "images_per_s": stats["images_per_s"],
            "step_ms": 1000 * stats["time_s"] / args.steps,
            "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                             if device.type == "cuda" else None),
            "peak_rss_gib": _peak_rss_gib(),
            "loss_first": stats["losses"][0],
            "loss_last": stats["losses"][-1],
        }
        return out

    iterator = iter(loader)
    first = next(iterator)  # also the synthetic batch: same structure and values
    result: dict[str, Any] = {
        "method": method, "arch": cfg.arch, "crop_size": cfg.crop_size,
        "batch_size": cfg.batch_size, "in_chans": dataset.num_bands,
        "modality": args.modality, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "channels_last": cfg.channels_last, "compile": cfg.compile,
        "workers": cfg.num_workers, "steps": args.steps, "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if method == "dino":
        result["n_local"] = cfg.n_local
    t0 = time.perf_counter()
    result["store"] = timed(_Continuing(iterator))
    synthetic = _to_device(first, device)
    result["synthetic"] = timed(_Repeat(synthetic))
    s, y = result["store"]["images_per_s"], result["synthetic"]["images_per_s"]
    result["store_vs_synthetic"] = s / y if y else None
    result["loader_overhead_pct"] = 100 * (1 - s / y) if y else None
    result["wall_s"] = time.perf_counter() - t0
    return result


def runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    out = []
    for m in args.methods:
        if m in CNN_METHODS:
            out.append((m, args.arch))
        if m in VIT_METHODS and (m != "dino" or args.dino_vit):
            out.append((m, args.vit_arch))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["moco", "dino", "mae", "data2vec"],
                    choices=["moco", "dino", "mae", "data2vec"], help="methods to run")
    ap.add_argument("--arch", default="resnet50",
                    help="CNN backbone of moco and dino (paper: resnet50)")
    ap.add_argument("--vit-arch", default="vit_small_patch16_224",
                    help="ViT backbone of dino, mae and data2vec (paper: vit_small_patch16_224)")
    ap.add_argument("--no-dino-vit", dest="dino_vit", action="store_false",
                    help="run dino on the CNN only (default: on both backbones)")
    ap.add_argument("--crop-size", type=int, default=224, help="training crop size, px")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size (per GPU)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps before each timed run (cudnn autotune, compile, "
                    "loader prefetch)")
    ap.add_argument("--n-local", type=int, default=8, help="dino local crops (paper: 8)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers (default: CPU cores - 2, at most 12; 0 on CPU)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: CUDA when available")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                    help="auto: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    ap.add_argument("--store", default=None,
                    help="existing store to read (default: write a temporary textured one)")
    ap.add_argument("--modality", default="S2L1C",
                    help="modality group read (S2L1C: 13 bands as the paper; S2L2A: 12)")
    ap.add_argument("--store-samples", type=int, default=256,
                    help="locations in the temporary store (sampled with replacement)")
    ap.add_argument("--patch-size", type=int, default=264,
                    help="patch size of the temporary store, px (SSL4EO-S12: 264)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, data and views")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.workers is None:
        args.workers = max(1, min(12, (os.cpu_count() or 4) - 2)) if cuda else 0
    with tempfile.TemporaryDirectory(prefix="ssl4eo-bench-") as tmp:
        store = args.store
        if store is None:
            t0 = time.perf_counter()
            store = str(write_textured_store(Path(tmp) / "bench.zarr", args.store_samples,
                                             args.modality, args.patch_size, args.seed))
            print(json.dumps({"store": store, "samples": args.store_samples,
                              "patch_size": args.patch_size, "modality": args.modality,
                              "write_s": round(time.perf_counter() - t0, 2)}),
                  file=sys.stderr, flush=True)
        for method, arch in runs(args):
            result = run_one(method, arch, args, store)
            gc.collect()  # the finished run's loader workers and CUDA memory
            if cuda:
                torch.cuda.empty_cache()
            line = json.dumps(result)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
