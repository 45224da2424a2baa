"""Loader over a small store in the layout of pipeline/layout.py (single process).

Multi-worker and multi-rank coverage is in test_loader_workers.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from store_fixtures import STAT_BASE, STAT_STD, expected_value, shard_file, write_store

from pipeline import layout
from pipeline.errors import StoreError
from pipeline.loader import (
    CorruptSampleError,
    StoreNormalize,
    ZarrPatchDataset,
    ZarrShardStream,
    _ShardReader,
    partition_shards,
)
from pipeline.transforms import Compose, RandomHorizontalFlip, RandomResizedCrop

S2, S1 = layout.S2L2A, layout.S1RTC
N = 20
STATUS = {3: "failed", 9: "pending"}
MISSING = {S1: [(5, 2)], S2: [(7, 0)]}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loader") / "cube.zarr"
    return write_store(
        path, N, (S2, S1), size=16, shard_samples=4, status=STATUS, missing=MISSING
    )


def _decode_s2(image: torch.Tensor, band: int = 0) -> tuple[int, int]:
    """(sample % 400, season) from a normalised S2 pixel of band ``band``."""
    dn = float(image[band, 5, 5]) * STAT_STD[S2] + STAT_BASE[S2] + band
    rest = round(dn) - 1000 - 20 * band
    return rest % 400, rest // 400


# ---------------------------------------------------------------------------- values
def test_normalisation_from_store_stats(store: Path) -> None:
    ds = ZarrPatchDataset(store, (S2, S1), seasons=1)
    item = ds[0]
    img = item["image"]
    assert img.dtype == torch.float32 and img.shape == (14, 16, 16)
    for b in range(12):
        want = (expected_value(S2, 0, 1, b) - (STAT_BASE[S2] + b)) / STAT_STD[S2]
        assert torch.allclose(img[b, 1:, 1:], torch.tensor(want), atol=1e-5), b
    for b in range(2):
        want = (expected_value(S1, 0, 1, b) - (STAT_BASE[S1] + b)) / STAT_STD[S1]
        assert torch.allclose(img[12 + b, 1:, 1:], torch.tensor(want), atol=1e-5), b
    # nodata (S2 0, S1 NaN) becomes 0.0 = the band mean after normalisation
    assert torch.all(img[:, 0, 0] == 0.0)
    assert ds.band_names == list(layout.BANDS[S2]) + list(layout.BANDS[S1])
    assert ds.num_bands == 14
    assert item["bands"] == ds.band_names
    assert item["sample"] == "0000000" and item["seasons"].tolist() == [1]


def test_normalisation_raw_and_given(store: Path) -> None:
    raw = ZarrPatchDataset(store, S2, seasons=2, normalize=False, fill_nodata=None)[1]["image"]
    assert raw[4, 3, 3] == expected_value(S2, 1, 2, 4) and raw[4, 0, 0] == 0.0
    s1 = ZarrPatchDataset(store, S1, seasons=2, normalize=False, fill_nodata=None)[1]["image"]
    assert torch.isnan(s1[:, 0, 0]).all()
    assert s1[1, 3, 3] == pytest.approx(expected_value(S1, 1, 2, 1))
    given = {"mean": [1000.0] * 12, "std": [10.0] * 12}
    img = ZarrPatchDataset(store, S2, seasons=2, normalize=given)[1]["image"]
    assert img[4, 3, 3] == pytest.approx((expected_value(S2, 1, 2, 4) - 1000) / 10)
    per_mod = {S2: given, S1: {"mean": [0.0, 0.0], "std": [2.0, 2.0]}}
    img = ZarrPatchDataset(store, (S2, S1), seasons=2, normalize=per_mod)[1]["image"]
    assert img[13, 3, 3] == pytest.approx(expected_value(S1, 1, 2, 1) / 2)
    with pytest.raises(ValueError, match="needs 12 means"):
        ZarrPatchDataset(store, S2, normalize={S2: {"mean": [1.0], "std": [1.0]}})


def test_stack_false_returns_per_modality(store: Path) -> None:
    ds = ZarrPatchDataset(store, (S2, S1), stack=False, seasons="all")
    item = ds[0]
    assert set(item["image"]) == {S2, S1}
    assert item["image"][S2].shape == (4, 12, 16, 16)
    assert item["image"][S1].shape == (4, 2, 16, 16)
    assert item["seasons"].tolist() == [0, 1, 2, 3]
    assert set(item["time"]) == {S2, S1} and item["time"][S2].dtype == torch.int64
    times = item["time"][S2].numpy().astype("datetime64[ns]")
    assert np.all(np.diff(times) > np.timedelta64(0))  # chronological
    for t in range(4):  # time order matches the seasons
        assert _decode_s2(item["image"][S2][t]) == (0, t)


# --------------------------------------------------------------- completeness, seasons
def test_incomplete_samples_are_never_served(store: Path) -> None:
    for ds in (
        ZarrPatchDataset(store, S2, seasons="random"),
        ZarrShardStream(store, S2, seasons="random"),
    ):
        ids = ds.sample_ids
        assert "0000003" not in ids and "0000009" not in ids
        served = [item["sample"] for item in (ds if isinstance(ds, ZarrShardStream) else
                                              (ds[k] for k in range(len(ds))))]
        assert sorted(served) == sorted(ids)
        assert len(served) == N - 2


def test_missing_seasons_are_skipped(store: Path) -> None:
    # S1 has no scene for sample 5 in season 2; S2 none for sample 7 in season 0
    both = ZarrPatchDataset(store, (S2, S1), seasons="all")
    assert "0000005" not in both.sample_ids and "0000007" not in both.sample_ids
    three = ZarrPatchDataset(store, (S2, S1), seasons="all", min_seasons=3)
    k = three.sample_ids.index("0000005")
    item = three[k]
    assert item["seasons"].tolist() == [0, 1, 3] and item["image"].shape[0] == 3
    assert [_decode_s2(item["image"][t])[1] for t in range(3)] == [0, 1, 3]
    fixed = ZarrPatchDataset(store, (S2, S1), seasons=2)
    assert "0000005" not in fixed.sample_ids and "0000007" in fixed.sample_ids
    s2_only = ZarrPatchDataset(store, S2, seasons=2)
    assert "0000005" in s2_only.sample_ids
    rnd = ZarrPatchDataset(store, (S2, S1), seasons="random")
    k = rnd.sample_ids.index("0000005")
    drawn = set()
    for epoch in range(40):
        rnd.set_epoch(epoch)
        drawn.add(int(rnd[k]["seasons"][0]))
    assert drawn == {0, 1, 3}


def test_augment_views_pair_seasons_of_one_location(store: Path) -> None:
    ds = ZarrPatchDataset(store, S2, seasons="augment", num_views=2)
    pairs: Counter[tuple[int, int]] = Counter()
    full = [k for k, sid in enumerate(ds.sample_ids) if sid != "0000007"]
    for epoch in range(30):
        ds.set_epoch(epoch)
        for k in full:
            item = ds[k]
            s = int(item["sample"])
            seasons = item["seasons"].tolist()
            assert len(item["views"]) == 2
            for view, season in zip(item["views"], seasons):
                assert view.shape == (12, 16, 16)
                assert _decode_s2(view) == (s, season)  # same location, the drawn season
            pairs[tuple(seasons)] += 1
    total = sum(pairs.values())
    assert len(pairs) == 16  # every (season1, season2) combination occurs
    # independent uniform draws: chi-square over the 16 cells (df 15; p=0.001 at 37.7)
    expected = total / 16
    chi2 = sum((pairs.get((a, b), 0) - expected) ** 2 / expected
               for a in range(4) for b in range(4))
    assert chi2 < 37.7, pairs
    same = sum(v for (a, b), v in pairs.items() if a == b) / total
    assert abs(same - 0.25) < 0.06
    # three views (DINO): all from the same location
    item = ZarrPatchDataset(store, S2, seasons="augment", num_views=3)[0]
    assert len(item["views"]) == 3
    assert all(_decode_s2(v)[0] == 0 for v in item["views"])


def test_seeded_items_are_reproducible(store: Path) -> None:
    aug = Compose([RandomResizedCrop(8, scale=(0.2, 1.0)), RandomHorizontalFlip()])
    a = ZarrPatchDataset(store, S2, seasons="augment", transform=aug, seed=3)
    b = ZarrPatchDataset(store, S2, seasons="augment", transform=aug, seed=3)
    x, y = a[2], b[2]
    assert x["seasons"].tolist() == y["seasons"].tolist()
    assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))
    assert x["views"][0].shape == (12, 8, 8)
    seen = set()
    for epoch in range(8):
        a.set_epoch(epoch)
        seen.add(tuple(a[2]["seasons"].tolist()))
    assert len(seen) > 1


def test_per_view_transforms(store: Path) -> None:
    crops = [RandomResizedCrop(8), RandomResizedCrop(8), RandomResizedCrop(4, scale=(0.05, 0.2))]
    item = ZarrPatchDataset(store, S2, seasons="augment", num_views=3, transform=crops)[0]
    assert [tuple(v.shape) for v in item["views"]] == [(12, 8, 8), (12, 8, 8), (12, 4, 4)]
    with pytest.raises(ValueError, match="one per view"):
        ZarrPatchDataset(store, S2, seasons="augment", num_views=2, transform=crops)


def test_collates_into_batches(store: Path) -> None:
    ds = ZarrPatchDataset(store, (S2, S1), seasons="augment")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["views"][0].shape == (4, 14, 16, 16)
    assert batch["seasons"].shape == (4, 2) and batch["lat"].shape == (4,)


# -------------------------------------------------------------------------- streaming
def test_stream_serves_each_sample_once_and_follows_epoch(store: Path) -> None:
    ds = ZarrShardStream(store, S2, seasons="random", buffer_size=5, seed=1)
    first = [item["sample"] for item in ds]
    assert sorted(first) == sorted(ds.sample_ids)
    second = [item["sample"] for item in ds]  # a second pass is the next epoch
    assert sorted(second) == sorted(first) and second != first
    ds.set_epoch(0)
    assert [item["sample"] for item in ds] == first  # deterministic from (seed, epoch)
    ordered = ZarrShardStream(store, S2, seasons=0, shuffle=False)
    assert [item["sample"] for item in ordered] == ordered.sample_ids


def test_stream_items_match_map_style(store: Path) -> None:
    kw = dict(modalities=(S2, S1), seasons="augment", seed=5)
    mapped = ZarrPatchDataset(store, **kw)
    by_id = {sid: k for k, sid in enumerate(mapped.sample_ids)}
    for item in ZarrShardStream(store, **kw):
        ref = mapped[by_id[item["sample"]]]
        assert item["seasons"].tolist() == ref["seasons"].tolist()
        assert all(torch.equal(u, v) for u, v in zip(item["views"], ref["views"]))


def test_partition_shards_balances_and_covers() -> None:
    counts = [4, 4, 3, 1, 4, 2, 4]
    parts = partition_shards(counts, [6, 5, 4, 3, 2, 1, 0], 3)
    assert sorted(s for p in parts for s in p) == list(range(7))
    loads = [sum(counts[s] for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(counts)


def test_stream_rank_lengths(store: Path) -> None:
    lengths = [
        len(ZarrShardStream(store, S2, seasons="random", rank=r, world_size=2)) for r in range(2)
    ]
    assert sum(lengths) == N - 2
    stream = ZarrShardStream(store, S2, seasons="random", rank=0, world_size=2)
    assert stream.rank_lengths() == lengths
    with pytest.raises(ValueError, match="out of range"):
        ZarrShardStream(store, S2, rank=2, world_size=2)


# ------------------------------------------------------------- even ranks (for DDP)
ODD_STATUS = {3: "failed", 9: "pending"}  # of 23: 21 servable, shards of 3, 4, 3, 4, 4, 3


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loader-odd") / "cube.zarr"
    return write_store(path, 23, (S2,), size=8, shard_samples=4, status=ODD_STATUS)


def _ranks(store: Path, world: int, **kw: object) -> list[ZarrShardStream]:
    return [ZarrShardStream(store, S2, **kw, rank=r, world_size=world) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_stream_even_modes_over_ranks(odd_store: Path, world: int) -> None:
    """pad: ceil(N/world) on every rank, every sample served; drop: floor(N/world), none
    twice; none: whole shards, exactly once, uneven. Per-sample and batches alike."""
    ids = [layout.sample_id(i) for i in range(23) if i not in ODD_STATUS]
    n = len(ids)
    assert n == 21
    for even in ("pad", "drop", "none"):
        kw = dict(seasons="random", seed=2, buffer_size=5, even=even)
        ranks = _ranks(odd_store, world, **kw)
        batched = _ranks(odd_store, world, **kw, batch_size=2, output="raw")
        for epoch in (0, 1):
            for st in ranks + batched:
                st.set_epoch(epoch)
            lengths = ranks[0].rank_lengths(epoch)
            assert [len(st) for st in ranks] == lengths  # before a pass advances the epoch
            got = [[item["sample"] for item in st] for st in ranks]
            assert [len(g) for g in got] == lengths
            assert all(len(set(g)) == len(g) for g in got)  # never twice on one rank
            seen = Counter(s for g in got for s in g)
            if even == "pad":
                assert lengths == [-(-n // world)] * world and sorted(seen) == ids
                assert sum(seen.values()) == world * -(-n // world)
            elif even == "drop":
                assert lengths == [n // world] * world and set(seen.values()) == {1}
                assert set(seen) <= set(ids)
            else:
                assert sorted(seen) == ids and set(seen.values()) == {1}
                assert len(set(lengths)) > 1  # 21 samples in whole shards: uneven
            sizes = [[len(w) for w in workers] for workers in ranks[0].plan(epoch, 3)]
            if even != "none":  # workers of every rank get the same counts
                per = lengths[0]
                want = [len(a) for a in np.array_split(np.arange(per), 3)]
                assert sizes == [want] * world
                steps = [st.num_batches(4, 3, epoch=epoch) for st in ranks]
                assert steps == [sum(-(-k // 4) for k in want)] * world
            # ready batches: the same samples per rank, len() batches, right values
            for r, st in enumerate(batched):
                n_batches = len(st)
                batches = list(st)
                assert len(batches) == n_batches == -(-lengths[r] // 2)
                assert n_batches == st.num_batches(epoch=epoch)
                assert sorted(s for b in batches for s in b["sample"]) == sorted(got[r])
                for b in batches:
                    for j, i in enumerate(b["index"].tolist()):
                        t = int(b["seasons"][j, 0])
                        assert int(b["image"][j, 0, 5, 5]) == expected_value(S2, i, t, 0)
        if even != "none":  # the dropped / repeated samples change with the epoch's order
            assert ranks[0].plan(0)[0][0].tolist() != ranks[0].plan(1)[0][0].tolist()


def test_stream_even_fewer_samples_than_ranks(tmp_path: Path) -> None:
    path = write_store(tmp_path / "tiny.zarr", 3, (S2,), size=8, shard_samples=4)
    ids = [layout.sample_id(i) for i in range(3)]
    for world in (4, 5):
        pad = _ranks(path, world, seasons=0)
        got = [[item["sample"] for item in st] for st in pad]
        assert got == [[ids[k % 3]] for k in range(world)]  # one shard, repeated from its start
        batches = [list(st) for st in _ranks(path, world, seasons=0, batch_size=2)]
        assert [[b["sample"] for b in x] for x in batches] == [[g] for g in got]
        drop = _ranks(path, world, seasons=0, even="drop")
        assert [len(st) for st in drop] == [0] * world and not any(list(st) for st in drop)
        drop_b = _ranks(path, world, seasons=0, even="drop", batch_size=2)
        assert [st.num_batches() for st in drop_b] == [0] * world
        assert not any(list(st) for st in drop_b)
    empty = write_store(tmp_path / "empty.zarr", 3, (S2,), size=8,
                        status={i: "failed" for i in range(3)})
    for even in ("pad", "drop", "none"):
        st = _ranks(empty, 2, seasons=0, even=even)
        assert [len(s) for s in st] == [0, 0] and not any(list(s) for s in st)


def test_stream_even_single_rank_is_exactly_once(odd_store: Path) -> None:
    """world_size 1: nothing padded or dropped, the same order in every mode."""
    orders = []
    for even in ("pad", "drop", "none"):
        st = ZarrShardStream(odd_store, S2, seasons="random", seed=4, buffer_size=5, even=even)
        orders.append([item["sample"] for item in st])
        assert sorted(orders[-1]) == st.sample_ids and len(st) == len(st.sample_ids)
        b = ZarrShardStream(odd_store, S2, seasons="random", seed=4, even=even, batch_size=4)
        assert sorted(s for x in b for s in x["sample"]) == st.sample_ids
    assert orders[0] == orders[1] == orders[2]


@pytest.mark.parametrize("seasons", [1, "all", "augment"])
def test_batch_reads_repeated_and_scattered_rows(store: Path, seasons: object) -> None:
    """A batch with a row twice and rows of several shards, through the shard reader and
    through zarr: every position holds its sample."""
    kw = dict(modalities=(S2, S1), stack=False, seasons=seasons, seed=5, output="raw")
    mapped = ZarrPatchDataset(store, **kw)
    by_id = {sid: k for k, sid in enumerate(mapped.sample_ids)}
    rows = np.array([0, 1, 1, 4, 4, 6, 13, 13])
    key = "views" if seasons == "augment" else "image"
    for direct in (True, False):
        ds = ZarrShardStream(store, **kw, batch_size=4)
        ds._direct_reads = direct
        batch = ds._read_batch(rows, 0)
        assert batch["index"].tolist() == rows.tolist()
        for j, sid in enumerate(batch["sample"]):
            ref = mapped[by_id[sid]]
            assert batch["seasons"][j].tolist() == ref["seasons"].tolist()
            got = [_pick(v, j) for v in batch[key]] if key == "views" else _pick(batch[key], j)
            _equal(got, ref[key])


def test_stream_even_options_are_checked(store: Path) -> None:
    with pytest.raises(ValueError, match="even must be"):
        ZarrShardStream(store, S2, even="repeat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without batch_size"):
        ZarrShardStream(store, S2, batch_size=4).num_batches(4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        ZarrShardStream(store, S2).num_batches()
    st = ZarrShardStream(store, S2, seasons=0, rank=1, world_size=3)
    assert st.even == "pad" and "even='pad'" in repr(st)
    assert st.num_batches(5, 2, drop_last=True) == 0  # 6 samples in workers of 3 and 3
    assert st.num_batches(5, 2) == 2 and st.num_batches(5) == 2


# ---------------------------------------------------------------------- remote stores
def test_reads_through_fsspec_url(store: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in store.rglob("*"):
        if f.is_file():
            fs.pipe(f"/loadertest/cube.zarr/{f.relative_to(store).as_posix()}", f.read_bytes())
    try:
        ds = ZarrPatchDataset("memory://loadertest/cube.zarr", S2, seasons=1)
        local = ZarrPatchDataset(store, S2, seasons=1)
        assert ds.sample_ids == local.sample_ids
        assert torch.equal(ds[4]["image"], local[4]["image"])
        stream = ZarrShardStream("memory://loadertest/cube.zarr", S2, seasons=1)
        assert sorted(i["sample"] for i in stream) == local.sample_ids
    finally:
        fs.rm("/loadertest", recursive=True)


# ----------------------------------------------------------------------------- errors
def test_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ZarrPatchDataset(tmp_path / "nope.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(StoreError, match="empty.zarr"):
        ZarrPatchDataset(tmp_path / "empty.zarr")


def test_incompatible_store_is_a_clear_error(tmp_path: Path) -> None:
    path = write_store(tmp_path / "old.zarr", 4, (S2,), size=8, schema_version="0")
    with pytest.raises(StoreError, match="schema version '0'.*reads version '1'"):
        ZarrPatchDataset(path)
    path = write_store(tmp_path / "s2.zarr", 4, (S2,), size=8)
    with pytest.raises(StoreError, match="no group 'S1RTC'.*S2L2A"):
        ZarrShardStream(path, (S2, S1))
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"][layout.ATTR_SCHEMA]
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="not written by this pipeline"):
        ZarrPatchDataset(path)


def test_missing_stats_is_a_clear_error(tmp_path: Path) -> None:
    path = write_store(tmp_path / "nostats.zarr", 4, (S2,), size=8, stats=False)
    with pytest.raises(StoreError, match="no band statistics for S2L2A"):
        ZarrPatchDataset(path)
    assert len(ZarrPatchDataset(path, normalize=False)) == 4


def test_corrupted_chunk_names_the_sample(tmp_path: Path) -> None:
    path = write_store(tmp_path / "bad.zarr", 8, (S2,), size=8, shard_samples=4)
    f = shard_file(path, S2, 1)  # samples 4..7
    f.write_bytes(np.random.default_rng(0).integers(0, 256, f.stat().st_size, np.uint8).tobytes())
    ds = ZarrPatchDataset(path, S2, seasons="random")
    assert ds[0]["sample"] == "0000000"  # the intact shard still reads
    with pytest.raises(CorruptSampleError, match="sample 0000005") as info:
        ds[5]
    assert "S2L2A" in str(info.value) and "bad.zarr" in str(info.value)
    with pytest.raises(CorruptSampleError, match="0000004, 0000005, 0000006, 0000007"):
        list(ZarrShardStream(path, S2, shuffle=False))


# ------------------------------------------------------------- raw output, normalisation
def test_raw_output_values_and_dtypes(store: Path) -> None:
    s2 = ZarrPatchDataset(store, S2, seasons=2, output="raw")[1]["image"]
    assert s2.dtype == torch.uint16 and s2.shape == (12, 16, 16)
    assert int(s2[4, 3, 3]) == expected_value(S2, 1, 2, 4)
    assert int(s2[4, 0, 0]) == 0  # nodata kept (fill_nodata applies to float32 output only)
    s1 = ZarrPatchDataset(store, S1, seasons=2, output="raw")[1]["image"]
    assert s1.dtype == torch.float32 and torch.isnan(s1[:, 0, 0]).all()
    assert float(s1[1, 3, 3]) == expected_value(S1, 1, 2, 1)  # stored dB, not normalised
    both = ZarrPatchDataset(store, (S2, S1), stack=False, seasons="all", output="raw")[0]
    assert both["image"][S2].dtype == torch.uint16 and both["image"][S2].shape == (4, 12, 16, 16)
    assert both["image"][S1].dtype == torch.float32 and both["image"][S1].shape == (4, 2, 16, 16)
    for t in range(4):
        assert int(both["image"][S2][t, 0, 5, 5]) == expected_value(S2, 0, t, 0)
    views = ZarrPatchDataset(store, S2, seasons="augment", num_views=3, output="raw", seed=2)
    item = views[0]
    assert len(item["views"]) == 3
    for v, t in zip(item["views"], item["seasons"].tolist()):
        assert v.dtype == torch.uint16 and int(v[0, 5, 5]) == expected_value(S2, 0, t, 0)
    stream = ZarrShardStream(store, (S2, S1), stack=False, seasons=1, output="raw")
    for item in stream:
        k = int(item["sample"])
        assert int(item["image"][S2][3, 5, 5]) == expected_value(S2, k, 1, 3)
    with pytest.raises(ValueError, match="different dtypes"):
        ZarrPatchDataset(store, (S2, S1), output="raw")
    with pytest.raises(ValueError, match="transforms"):
        ZarrPatchDataset(store, S2, output="raw", transform=RandomHorizontalFlip())
    with pytest.raises(ValueError, match="output must be"):
        ZarrPatchDataset(store, S2, output="float16")  # type: ignore[arg-type]


NORM_CASES = [
    dict(seasons=1),
    dict(seasons="random", seed=4),
    dict(seasons="all"),
    dict(seasons="all", min_seasons=3),  # items with 3 or 4 seasons
    dict(seasons="augment", num_views=3, seed=1),
    dict(seasons=0, normalize=False),
    dict(seasons=3, fill_nodata=None),
    dict(seasons=2, fill_nodata=-7.5, normalize={S2: {"mean": [900.0] * 12, "std": [3.0] * 12},
                                                 S1: {"mean": [-1.0, 2.0], "std": [0.7, 9.0]}}),
]


def _equal(a: object, b: object) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kw", NORM_CASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_store_normalize_equals_float32_path(store: Path, kw: dict) -> None:
    raw = ZarrPatchDataset(store, (S2, S1), stack=False, output="raw", **kw)
    flt = ZarrPatchDataset(store, (S2, S1), **kw)
    per_mod = ZarrPatchDataset(store, (S2, S1), stack=False, **kw)
    norm = StoreNormalize.from_store(raw, stack=True)
    norm_split = StoreNormalize.from_store(raw)  # the dataset's stack=False
    key = "views" if kw["seasons"] == "augment" else "image"
    for k in range(len(raw)):
        item = raw[k]
        before = {m: t.clone() for m, t in (item[key][0] if key == "views" else item[key]).items()}
        _equal(norm(item)[key], flt[k][key])
        _equal(norm_split(item)[key], per_mod[k][key])
        after = item[key][0] if key == "views" else item[key]
        _equal(after, before)  # the input is left as it was
    # from a URL with the same options: the same module
    url_norm = StoreNormalize.from_store(
        store, (S2, S1), normalize=kw.get("normalize", True),
        fill_nodata=kw.get("fill_nodata", 0.0),
    )
    _equal(url_norm(raw[0])[key], flt[0][key])
    # collated batches, and a stacked single-modality tensor
    size = 1 if "min_seasons" in kw else 5  # items with different numbers of seasons
    loader = torch.utils.data.DataLoader(raw, batch_size=size)
    ref = torch.utils.data.DataLoader(flt, batch_size=size)
    for a, b in zip(loader, ref):
        _equal(norm(a)[key], b[key])
    s2_raw = ZarrPatchDataset(store, S2, output="raw", **kw)
    s2_flt = ZarrPatchDataset(store, S2, **kw)
    s2_norm = StoreNormalize.from_store(s2_raw)
    x = s2_raw[2][key]
    assert isinstance(x, (torch.Tensor, list))
    _equal(s2_norm(x), s2_flt[2][key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_store_normalize_on_gpu(store: Path) -> None:
    raw = ZarrShardStream(store, (S2, S1), stack=False, output="raw", seasons="augment",
                          batch_size=4, seed=3)
    flt = ZarrShardStream(store, (S2, S1), seasons="augment", batch_size=4, seed=3)
    norm = StoreNormalize.from_store(raw, stack=True)  # left on the CPU: stats follow the batch
    for a, b in zip(raw, flt):
        views = [{m: t.cuda() for m, t in v.items()} for v in a["views"]]
        out = norm(views)
        assert all(v.device.type == "cuda" for v in out)
        _equal([v.cpu() for v in out], b["views"])


def test_store_normalize_checks_its_input(store: Path) -> None:
    norm = StoreNormalize.from_store(store, (S2, S1))
    assert norm.mean.shape == (14,) and norm.inv_std.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[\.\.\., 14, H, W\]"):
        norm(torch.zeros(12, 4, 4, dtype=torch.uint16))
    with pytest.raises(ValueError, match="missing"):
        norm({S2: torch.zeros(12, 4, 4, dtype=torch.uint16)})
    with pytest.raises(ValueError, match="keys"):
        norm({"S2L1C": torch.zeros(12, 4, 4)})
    out = norm({S2: torch.zeros(2, 12, 4, 4, dtype=torch.uint16),
                S1: torch.full((2, 2, 4, 4), float("nan"))})
    assert out.shape == (2, 14, 4, 4) and torch.all(out == 0.0)  # all nodata -> fill 0.0


# ---------------------------------------------------------------------- batched stream
def _batch_samples(batches: list[dict]) -> list[list[str]]:
    return [b["sample"] for b in batches]


def test_batched_stream_exactly_once_and_deterministic(store: Path) -> None:
    kw = dict(modalities=(S2, S1), stack=False, output="raw", seasons="random", seed=1)
    ds = ZarrShardStream(store, **kw, batch_size=3, buffer_size=5)
    first = list(ds)
    assert len(first) == len(ds) == -(-(N - 2) // 3)
    assert [len(b["sample"]) for b in first] == [3] * (len(first) - 1) + [len(first[-1]["sample"])]
    served = [s for b in first for s in b["sample"]]
    assert sorted(served) == ds.sample_ids and len(set(served)) == len(served)
    for b in first:
        assert b["index"].tolist() == sorted(b["index"].tolist())  # store order in a batch
        assert [layout.sample_id(i) for i in b["index"].tolist()] == b["sample"]
        assert b["image"][S2].dtype == torch.uint16 and b["image"][S2].shape[1:] == (12, 16, 16)
        assert b["seasons"].shape == (len(b["sample"]), 1)
        assert b["lat"].dtype == torch.float64 and b["bands"] == ds.band_names
    assert _batch_samples(first) == [[layout.sample_id(i) for i in rows]
                                     for rows in ds.batch_plan(0)]
    second = list(ds)  # the next epoch
    assert sorted(s for b in second for s in b["sample"]) == ds.sample_ids
    assert _batch_samples(second) != _batch_samples(first)
    ds.set_epoch(0)
    again = list(ds)
    assert _batch_samples(again) == _batch_samples(first)
    for a, b in zip(again, first):
        assert torch.equal(a["image"][S2], b["image"][S2])
        assert torch.equal(a["seasons"], b["seasons"])
    # a window of many shards mixes them into one batch; no shuffle: store order
    mixed = ZarrShardStream(store, **kw, batch_size=4, buffer_size=100)
    assert any(len({i // 4 for i in b["index"].tolist()}) > 2 for b in mixed)
    ordered = ZarrShardStream(store, **kw, batch_size=4, shuffle=False)
    assert [s for b in ordered for s in b["sample"]] == ordered.sample_ids
    # two ranks: every sample once, len() in batches
    ranks = [ZarrShardStream(store, **kw, batch_size=3, rank=r, world_size=2) for r in range(2)]
    got = [s for r in ranks for b in r for s in b["sample"]]
    assert sorted(got) == ds.sample_ids and len(got) == len(set(got))
    assert [len(r) for r in ranks] == [-(-n // 3) for n in ranks[0].rank_lengths()]


def _pick(x: object, j: int) -> object:
    """Sample ``j`` of a batched tensor or ``{modality: tensor}``."""
    if isinstance(x, dict):
        return {m: t[j] for m, t in x.items()}
    return x[j]  # type: ignore[index]


@pytest.mark.parametrize("seasons", [1, "random", "all", "augment"])
@pytest.mark.parametrize("output", ["raw", "float32"])
def test_batched_stream_items_match_per_sample(store: Path, seasons: object, output: str) -> None:
    kw = dict(modalities=(S2, S1), stack=output == "float32", seasons=seasons, seed=5,
              output=output)
    mapped = ZarrPatchDataset(store, **kw)
    by_id = {sid: k for k, sid in enumerate(mapped.sample_ids)}
    batched = ZarrShardStream(store, **kw, batch_size=4)
    through_zarr = ZarrShardStream(store, **kw, batch_size=4)
    through_zarr._direct_reads = False  # zarr reads (runs of rows) instead of the shard reader
    key = "views" if seasons == "augment" else "image"
    seen = 0
    for batch, other in zip(batched, through_zarr, strict=True):
        _equal(batch[key], other[key])
        for j, sid in enumerate(batch["sample"]):
            ref = mapped[by_id[sid]]
            assert batch["seasons"][j].tolist() == ref["seasons"].tolist()
            assert batch["time"][S1][j].tolist() == ref["time"][S1].tolist()
            assert float(batch["lat"][j]) == ref["lat"] and int(batch["index"][j]) == ref["index"]
            got = ([_pick(v, j) for v in batch[key]] if key == "views"
                   else _pick(batch[key], j))
            _equal(got, ref[key])
            seen += 1
    assert seen == len(mapped)


def test_batched_stream_options_are_checked(store: Path) -> None:
    with pytest.raises(ValueError, match="batch_size must be"):
        ZarrShardStream(store, S2, batch_size=0)
    with pytest.raises(ValueError, match="per-sample transforms"):
        ZarrShardStream(store, S2, batch_size=4, transform=RandomHorizontalFlip())
    with pytest.raises(ValueError, match="fewer than 4 seasons"):
        ZarrShardStream(store, S2, seasons="all", min_seasons=3, batch_size=4)
    with pytest.raises(ValueError, match="needs a stream made with batch_size"):
        ZarrShardStream(store, S2).batch_plan()


def test_shard_reader_matches_zarr(store: Path, tmp_path: Path) -> None:
    import zarr
    from zarr.codecs import BloscCodec

    arrays = [zarr.open_array(str(store / m / "bands"), mode="r") for m in (S2, S1)]  # zstd
    data = np.random.default_rng(0).integers(1, 3000, (6, 4, 3, 8, 8)).astype(np.uint16)
    data[2, 1] = 0  # an all-fill chunk: not written, read as the fill value
    blosc = zarr.create_array(
        str(tmp_path / "blosc.zarr"), shape=data.shape, dtype="uint16", chunks=(1, 1, 3, 8, 8),
        shards=(4, 4, 3, 8, 8), fill_value=0,
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    )
    blosc[...] = data
    for arr in [*arrays, blosc]:
        reader = _ShardReader.of(arr)
        assert reader is not None
        items = [(i, t, np.empty(arr.shape[2:], arr.dtype))
                 for i in range(arr.shape[0]) for t in range(arr.shape[1])]
        assert reader.read(items) == []
        for i, t, out in items:
            np.testing.assert_array_equal(out, arr[i, t])
    assert reader._shard_index((0, 0))[1][2, 1].tolist() == [2**64 - 1] * 2
    other = zarr.create_array(str(tmp_path / "split.zarr"), shape=(4, 4, 3, 8, 8),
                              dtype="uint16", chunks=(1, 1, 1, 8, 8), shards=(4, 4, 3, 8, 8))
    assert _ShardReader.of(other) is None  # not the pipeline's layout: zarr reads it
    assert _ShardReader.of(zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4, 3, 8, 8),
                                             dtype="uint16", chunks=(1, 1, 3, 8, 8))) is None


def test_batched_stream_names_corrupt_samples(tmp_path: Path) -> None:
    path = write_store(tmp_path / "bad.zarr", 8, (S2,), size=8, shard_samples=4)
    f = shard_file(path, S2, 1)  # samples 4..7
    f.write_bytes(np.random.default_rng(0).integers(0, 256, f.stat().st_size, np.uint8).tobytes())
    for direct in (True, False):
        ds = ZarrShardStream(path, S2, shuffle=False, batch_size=3, output="raw")
        ds._direct_reads = direct
        batches = iter(ds)
        assert next(batches)["sample"] == ["0000000", "0000001", "0000002"]
        with pytest.raises(CorruptSampleError, match="0000004, 0000005") as info:
            list(batches)
        assert "S2L2A" in str(info.value) and "bad.zarr" in str(info.value)


def test_batched_stream_through_fsspec_url(store: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in store.rglob("*"):
        if f.is_file():
            fs.pipe(f"/batchtest/cube.zarr/{f.relative_to(store).as_posix()}", f.read_bytes())
    try:
        kw = dict(modalities=(S2, S1), stack=False, output="raw", seasons="augment", seed=2,
                  batch_size=4)
        remote = ZarrShardStream("memory://batchtest/cube.zarr", **kw)
        local = ZarrShardStream(store, **kw)
        pairs = list(zip(remote, local, strict=True))
        assert remote._reader(S2) is not None  # the shard reader, through the fsspec store
        for a, b in pairs:
            assert a["sample"] == b["sample"]
            _equal(a["views"], b["views"])
    finally:
        fs.rm("/batchtest", recursive=True)
