"""2 ranks x 3 DataLoader workers (spawn / forkserver): every sample exactly once per epoch.

Ranks are simulated in one process: DistributedSampler(num_replicas=2, rank=r) for the
map-style dataset, explicit rank/world_size for the stream. The workers are real processes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from store_fixtures import write_store
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import layout
from pipeline.loader import ZarrPatchDataset, ZarrShardStream

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

S2, S1 = layout.S2L2A, layout.S1RTC
N = 30
STATUS = {2: "failed", 11: "pending", 12: "pending", 29: "failed"}  # 26 servable


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "cube.zarr"
    return write_store(path, N, (S2, S1), size=8, shard_samples=4, status=STATUS)


def _servable() -> list[str]:
    return [layout.sample_id(i) for i in range(N) if i not in STATUS]


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


def test_stream_two_ranks_three_workers_two_epochs(store: Path) -> None:
    epochs: list[list[str]] = [[], []]
    for rank in range(2):
        ds = ZarrShardStream(
            store, (S2, S1), seasons="random", rank=rank, world_size=2, buffer_size=6, seed=7
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
        del loader
    for got in epochs:
        seen = Counter(got)
        assert sorted(seen) == _servable()
        assert set(seen.values()) == {1}
    assert epochs[0] != epochs[1]  # reshuffled


def test_batched_stream_two_ranks_three_workers_two_epochs(store: Path) -> None:
    """Ready batches (DataLoader(batch_size=None)) from 3 workers: every sample once per epoch
    over both ranks, and the batches, order and values of one process iterating alone."""
    import torch

    kw = dict(modalities=(S2, S1), stack=False, seasons="augment", output="raw", seed=7,
              buffer_size=8, batch_size=3)
    epochs: list[list[str]] = [[], []]
    for rank in range(2):
        ds = ZarrShardStream(store, **kw, rank=rank, world_size=2)
        loader = DataLoader(
            ds, batch_size=None, num_workers=3, multiprocessing_context="forkserver",
            persistent_workers=True,
        )
        for epoch in range(2):  # persistent workers move to the next epoch by themselves
            alone = ZarrShardStream(store, **kw, rank=rank, world_size=2)
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
        assert sorted(seen) == _servable()
        assert set(seen.values()) == {1}
    assert epochs[0] != epochs[1]  # reshuffled
