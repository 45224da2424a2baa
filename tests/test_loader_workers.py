"""2 ranks x 3 DataLoader workers (spawn / forkserver).

Map-style and ``ZarrShardStream(even="none")``: every sample exactly once per epoch. The
stream's ``"pad"`` (default) and ``"drop"``: the same number of batches on every rank, every
sample at least once (pad) or at most once (drop). The stream's store has an odd number of
servable samples in uneven shards, so the modes differ.

Ranks are simulated in one process: DistributedSampler(num_replicas=2, rank=r) for the
map-style dataset, explicit rank/world_size for the stream. The workers are real processes.
A real two-process torch.distributed run is in test_loader_ddp.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from store_fixtures import write_store
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from pipeline import layout
from pipeline.loader import ZarrPatchDataset, ZarrShardStream

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

S2, S1 = layout.S2L2A, layout.S1RTC
N = 30
STATUS = {2: "failed", 11: "pending", 12: "pending", 29: "failed"}  # 26 servable
#: the stream's store: 27 servable samples, shards of 3, 4, 3, 3, 4, 4, 4, 2
N_ODD = 31


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "cube.zarr"
    return write_store(path, N, (S2, S1), size=8, shard_samples=4, status=STATUS)


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("workers-odd") / "cube.zarr"
    return write_store(path, N_ODD, (S2, S1), size=8, shard_samples=4, status=STATUS)


def _servable(n: int = N) -> list[str]:
    return [layout.sample_id(i) for i in range(n) if i not in STATUS]


def test_map_style_two_ranks_three_workers(store: Path) -> None:
    ds = ZarrPatchDataset(store, (S2, S1), seasons="augment")
    assert ds.sample_ids == _servable() and len(ds) % 2 == 0
    per_rank: dict[int, list[str]] = {}
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(3)
        ds.set_epoch(3)
        loader = DataLoader(
            ds, batch_size=3, sampler=sampler, num_workers=3, multiprocessing_context="spawn"
        )
        per_rank[rank] = []
        for batch in loader:
            assert batch["views"][0].shape[1:] == (14, 8, 8)
            per_rank[rank] += batch["sample"]
    seen = Counter(per_rank[0] + per_rank[1])
    assert sorted(seen) == _servable()
    assert set(seen.values()) == {1}
    assert len(per_rank[0]) == len(per_rank[1]) == len(ds) // 2


def test_stream_two_ranks_three_workers_two_epochs(odd_store: Path) -> None:
    """even="none": whole shards per rank and worker, every sample exactly once."""
    epochs: list[list[str]] = [[], []]
    for rank in range(2):
        ds = ZarrShardStream(
            odd_store, (S2, S1), seasons="random", rank=rank, world_size=2, buffer_size=6,
            seed=7, even="none",
        )
        expected_len = ds.rank_lengths()
        loader = DataLoader(
            ds, batch_size=4, num_workers=3, multiprocessing_context="forkserver",
            persistent_workers=True,
        )
        for epoch in range(2):  # persistent workers move to the next epoch by themselves
            got: list[str] = []
            for batch in loader:
                assert batch["image"].shape[1:] == (14, 8, 8)
                got += batch["sample"]
            assert len(got) == ds.rank_lengths(epoch)[rank]
            epochs[epoch] += got
        assert expected_len == ds.rank_lengths(0)
        assert expected_len[0] != expected_len[1]  # 27 samples: uneven without pad or drop
        del loader
    for got in epochs:
        seen = Counter(got)
        assert sorted(seen) == _servable(N_ODD)
        assert set(seen.values()) == {1}
    assert epochs[0] != epochs[1]  # reshuffled


def test_batched_stream_two_ranks_three_workers_two_epochs(odd_store: Path) -> None:
    """Ready batches (DataLoader(batch_size=None)) from 3 workers, even="none": every sample
    once per epoch over both ranks, and the batches, order and values of one process iterating
    alone."""
    import torch

    kw = dict(modalities=(S2, S1), stack=False, seasons="augment", output="raw", seed=7,
              buffer_size=8, batch_size=3, even="none")
    epochs: list[list[str]] = [[], []]
    for rank in range(2):
        ds = ZarrShardStream(odd_store, **kw, rank=rank, world_size=2)
        loader = DataLoader(
            ds, batch_size=None, num_workers=3, multiprocessing_context="forkserver",
            persistent_workers=True,
        )
        for epoch in range(2):  # persistent workers move to the next epoch by themselves
            alone = ZarrShardStream(odd_store, **kw, rank=rank, world_size=2)
            alone.set_epoch(epoch)
            n_batches = len(alone)
            expected = list(alone)
            got = [batch for batch in loader]  # not list(): it asks len(), of epoch 0
            assert len(got) == len(expected) == n_batches
            for batch, ref in zip(got, expected):
                assert batch["sample"] == ref["sample"]
                assert torch.equal(batch["seasons"], ref["seasons"])
                for view, ref_view in zip(batch["views"], ref["views"], strict=True):
                    assert view[S2].dtype == torch.uint16 and view[S2].shape[1:] == (12, 8, 8)
                    assert torch.equal(view[S2], ref_view[S2])
                    torch.testing.assert_close(view[S1], ref_view[S1], rtol=0, atol=0,
                                               equal_nan=True)  # S1 nodata is NaN
                epochs[epoch] += batch["sample"]
        del loader
    for got in epochs:
        seen = Counter(got)
        assert sorted(seen) == _servable(N_ODD)
        assert set(seen.values()) == {1}
    assert epochs[0] != epochs[1]  # reshuffled


class _Passes(IterableDataset):
    """Pass ``k`` iterates ``streams[k]``: one persistent DataLoader (one start of its workers)
    for several streams. A stream listed twice is one object in each worker's copy, so its
    second pass is its next epoch."""

    def __init__(self, streams: Sequence[ZarrShardStream]) -> None:
        self.streams = list(streams)
        self._pass = 0

    def __iter__(self) -> Iterator[Any]:
        stream = self.streams[self._pass]
        self._pass += 1
        return iter(stream)


@pytest.mark.parametrize("batched", [False, True], ids=["per-sample", "batches"])
def test_even_stream_two_ranks_three_workers(odd_store: Path, batched: bool) -> None:
    """27 samples over 2 ranks x 3 workers. Per-sample (DataLoader(batch_size=4), each worker
    collating its own samples) and ready batches (batch_size=3, DataLoader(batch_size=None)):
    both ranks yield the same number of batches, num_batches() / len(); "pad" (epochs 0 and 1)
    serves every sample, 28 in all, "drop" 26 distinct ones."""
    kw: dict[str, Any] = dict(modalities=(S2, S1), seasons="random", seed=7, buffer_size=6)
    if batched:
        kw.update(batch_size=3, output="raw", stack=False)
    cases = [("pad", 0), ("pad", 1), ("drop", 0)]
    got: list[list[list[list[str]]]] = [[] for _ in cases]  # [case][rank] -> batches
    refs: list[dict[str, ZarrShardStream]] = []
    for rank in range(2):
        streams = {e: ZarrShardStream(odd_store, **kw, even=e, rank=rank, world_size=2)
                   for e in ("pad", "drop")}
        refs.append(streams)
        loader = DataLoader(
            _Passes([streams[e] for e, _ in cases]), batch_size=None if batched else 4,
            num_workers=3, multiprocessing_context="forkserver", persistent_workers=True,
        )
        for k in range(len(cases)):
            got[k].append([batch["sample"] for batch in loader])
        del loader
    servable = _servable(N_ODD)
    assert len(servable) == 27
    for k, (even, epoch) in enumerate(cases):
        per_rank = got[k]
        for rank, batches in enumerate(per_rank):
            ref = refs[rank][even]
            samples = [s for b in batches for s in b]
            assert len(samples) == ref.rank_lengths(epoch)[rank] == (14 if even == "pad" else 13)
            assert len(set(samples)) == len(samples)  # never twice on one rank
            rows = [int(i) for w in ref.plan(epoch, 3)[rank] for i in w]
            assert sorted(samples) == sorted(layout.sample_id(i) for i in rows)
            if batched:
                assert len(batches) == ref.num_batches(epoch=epoch) == 5
                ref.set_epoch(epoch)
                assert len(ref) == len(batches)
                assert batches == [[layout.sample_id(i) for i in b] for b in ref.batch_plan()]
            else:  # worker sizes 5, 5, 4 (pad) or 5, 4, 4 (drop) in batches of 4
                assert len(batches) == ref.num_batches(4, 3, epoch=epoch)
                assert len(batches) == (5 if even == "pad" else 4)
        assert len(per_rank[0]) == len(per_rank[1])  # the same number of steps on both ranks
        seen = Counter(s for batches in per_rank for b in batches for s in b)
        if even == "pad":
            assert sorted(seen) == servable and sum(seen.values()) == 28
            assert sorted(seen.values()) == [1] * 26 + [2]
        else:
            assert set(seen) <= set(servable) and sum(seen.values()) == 26
            assert set(seen.values()) == {1}
    assert got[0] != got[1]  # pad's epoch 1 (persistent workers) is reshuffled
