"""ZarrShardStream under a real two-process torch.distributed (gloo) run, 3 DataLoader workers
per rank, one all_reduce per step (as DDP's gradient all-reduce): the default ``even="pad"``
gives both ranks the same number of steps, so the run finishes.

The store has 27 servable samples in uneven shards. With ``even="none"`` the ranks would take
different numbers of steps (one would wait in an all_reduce the other never makes); that is
shown from the plan, without running a job that hangs.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from store_fixtures import write_store

from pipeline import layout
from pipeline.loader import ZarrShardStream

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

S2 = layout.S2L2A
N = 31
STATUS = {2: "failed", 11: "pending", 12: "pending", 29: "failed"}  # 27 servable
WORLD, WORKERS, B = 2, 3, 3
#: (name, stream options, DataLoader batch_size): per-sample items, ready batches
MODES = [
    ("per-sample", {}, B),
    ("batches", {"batch_size": B, "output": "raw"}, None),
]
STREAM = dict(modalities=S2, seasons="random", seed=7, buffer_size=6)


def _rank_main(rank: int, store: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    result = {}
    try:
        for name, kw, loader_batch in MODES:
            ds = ZarrShardStream(store, **STREAM, **kw)  # rank, world_size: torch.distributed
            loader = DataLoader(ds, batch_size=loader_batch, num_workers=WORKERS,
                                multiprocessing_context="forkserver")
            steps, samples = 0, []
            for batch in loader:
                t = torch.tensor([float(len(batch["sample"]))])
                dist.all_reduce(t)  # blocks until the other rank makes the same step
                steps += 1
                samples += batch["sample"]
            expected = ds.num_batches(loader_batch, WORKERS) if loader_batch else len(ds)
            result[name] = {"steps": steps, "samples": samples, "expected": expected,
                            "rank": ds._world()[0]}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_ddp_gloo_two_ranks_three_workers_finish(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    store = write_store(tmp_path / "cube.zarr", N, (S2,), size=8, shard_samples=4,
                        status=STATUS)
    # what even="none" would do here: different step counts on the two ranks (a hang)
    for name, kw, loader_batch in MODES:
        none = [ZarrShardStream(store, **STREAM, **kw, even="none", rank=r, world_size=WORLD)
                for r in range(WORLD)]
        steps = [s.num_batches(loader_batch, WORKERS) if loader_batch else len(s)
                 for s in none]
        assert steps[0] != steps[1], (name, steps)
    ctx = mp.start_processes(_rank_main, args=(str(store), str(tmp_path / "init"),
                                               str(tmp_path)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two-rank run did not finish in 120 s (a rank waits in all_reduce)")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    servable = [layout.sample_id(i) for i in range(N) if i not in STATUS]
    for name, _, _ in MODES:
        per_rank = [res[name] for res in results]
        assert [r["rank"] for r in per_rank] == [0, 1]  # taken from torch.distributed
        assert per_rank[0]["steps"] == per_rank[1]["steps"] > 0
        assert all(r["steps"] == r["expected"] for r in per_rank)
        samples = [s for r in per_rank for s in r["samples"]]
        assert sorted(set(samples)) == servable and len(samples) == 28  # 2 x ceil(27 / 2)
        assert all(len(set(r["samples"])) == len(r["samples"]) == 14 for r in per_rank)
