"""What makes pretraining on a small store learn: shared view regions, repeated passes,
MoCo's split BatchNorm in one process, the kNN probe and the collapse measure.

CPU only, small backbones, torch on one thread. The benchmark that shows the learning on the
demo store and EuroSAT-MS is ``benchmarks/learning.py`` (too slow for a test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from store_fixtures import write_store

from pipeline import layout

pytest.importorskip("timm")

from pipeline.train.augment import SharedRegion, recipe, region_size  # noqa: E402
from pipeline.train.backbones import BackboneSpec  # noqa: E402
from pipeline.train.cli import small_config  # noqa: E402
from pipeline.train.engine import RepeatDataset, build_dataset  # noqa: E402
from pipeline.train.methods import MoCo  # noqa: E402
from pipeline.train.probe import feature_spread, knn_cross_validate, stratified_folds  # noqa: E402

S2 = layout.S2L2A


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module on one torch thread."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("learn") / "cube.zarr"
    return write_store(path, 6, (S2,), size=48, shard_samples=3)


def _learning_module():  # benchmarks/learning.py, for its recipes and store
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "learning", Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ views
def test_region_keeps_the_papers_ground_size() -> None:
    assert region_size(224) is None and region_size(256) is None  # the paper: whole patch
    assert region_size(64) == 75  # 264 * 64 / 224
    assert region_size(32) == 38


def test_shared_region_is_the_same_for_every_view_of_an_item() -> None:
    x = torch.arange(2 * 40 * 40, dtype=torch.float32).view(2, 40, 40)
    t = SharedRegion(16)
    g = torch.Generator().manual_seed(11)
    a, b = t(x, generator=g), t(x, generator=g)  # two views drawn from one item generator
    assert a.shape == (2, 16, 16) and torch.equal(a, b)
    windows = {tuple(t(x, generator=torch.Generator().manual_seed(s))[0, 0, :1].tolist())
               for s in range(20)}
    assert len(windows) > 5  # other items, other windows
    assert torch.equal(SharedRegion(64)(x), x)  # a patch smaller than the region: unchanged


def test_small_views_overlap_inside_the_region(store: Path) -> None:
    # every view of an item comes from the same 38 px window of the 48 px patch (crop 32)
    views = recipe("moco", 32)
    x = torch.randn(12, 48, 48)
    g = torch.Generator().manual_seed(3)
    region = SharedRegion(38)(x, generator=torch.Generator().manual_seed(3))
    out = [v(x, generator=g) for v in views]
    assert all(o.shape == (12, 32, 32) for o in out)
    # the views' values lie within the region's range band by band (crops, resize, colour
    # jitter aside, the region bounds what a view can see): compare the un-jittered recipe
    plain = recipe("mae", 32)[0]
    y = plain(x, generator=torch.Generator().manual_seed(3))
    assert y.amax() <= region.amax() + 1e-5 and y.amin() >= region.amin() - 1e-5


# ------------------------------------------------------------------ repeated passes
def test_repeat_dataset_draws_new_views_each_pass(store: Path) -> None:
    cfg = small_config("mae", str(store), "unused", crop_size=32).resolved()
    base = build_dataset(cfg)
    rep = RepeatDataset(build_dataset(cfg), 3)
    n = len(base)
    assert len(rep) == 3 * n and rep.num_bands == base.num_bands
    assert rep.band_names == base.band_names
    rep.set_epoch(0)
    first, again, second_pass = rep[1]["image"], rep[1]["image"], rep[1 + n]["image"]
    assert torch.equal(first, again)  # a function of (seed, epoch, index)
    assert not torch.equal(first, second_pass)  # another pass, other views
    rep.set_epoch(1)
    assert not torch.equal(rep[1]["image"], first)
    base.set_epoch(0)
    assert torch.equal(base[1]["image"], first)  # pass 0 of epoch 0 is the store's epoch 0
    with pytest.raises(IndexError):
        rep[3 * n]
    cfg2 = small_config("mae", str(store), "unused", crop_size=32, repeats=4).resolved()
    assert len(build_dataset(cfg2)) == 4 * n


# ------------------------------------------------------------------------ MoCo split BN
def test_moco_splits_batchnorm_in_one_process() -> None:
    cnn = MoCo(BackboneSpec("resnet18", 4), dim=16, queue_size=64)
    assert [cnn._local_splits(b) for b in (32, 16, 8, 6, 4, 7)] == [4, 4, 2, 1, 1, 1]
    vit = MoCo(BackboneSpec("vit_tiny_patch16_224", 4, 32), dim=16, queue_size=64)
    assert vit._local_splits(32) == 1  # no BatchNorm, nothing to leak
    off = MoCo(BackboneSpec("resnet18", 4), dim=16, queue_size=64, bn_splits=1)
    assert off._local_splits(32) == 1


def test_moco_keys_do_not_see_their_querys_batch_statistics() -> None:
    # With one BN group, a key's features depend on the other keys of the batch. With split
    # BN, a key only depends on its own group: changing images in another group leaves it.
    torch.manual_seed(0)
    m = MoCo(BackboneSpec("resnet18", 4), dim=16, queue_size=64, bn_splits=2)
    m.train()
    x = torch.randn(8, 4, 32, 32)
    torch.manual_seed(1)
    q1 = torch.cat([m.encoder_q(c) for c in x.chunk(2)])
    y = x.clone()
    y[4:] += 3.0  # only the second group changes
    q2 = torch.cat([m.encoder_q(c) for c in y.chunk(2)])
    assert torch.allclose(q1[:4], q2[:4]) and not torch.allclose(q1[4:], q2[4:])
    loss = m([x, x.flip(-1)])  # the split forward runs and gives a finite loss
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------ probe tools
def test_knn_probe_separates_clusters_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = rng.normal(0, 5, (4, 16))
    clustered = torch.from_numpy(centres[labels] + rng.normal(0, 1, (120, 16)))
    folds = stratified_folds(labels, 5, 0)
    assert knn_cross_validate(clustered, labels, folds)["accuracy_mean"] > 0.95
    noise = torch.from_numpy(rng.normal(0, 1, (120, 16)))
    assert knn_cross_validate(noise, labels, folds)["accuracy_mean"] < 0.45


def test_feature_spread_detects_collapse() -> None:
    torch.manual_seed(0)
    healthy = torch.randn(200, 64)
    collapsed = torch.ones(200, 64) + 1e-4 * torch.randn(200, 64)
    assert feature_spread(healthy) > 0.9
    assert feature_spread(collapsed) < 0.01


REPO = Path(__file__).resolve().parents[1]
EUROSAT = (REPO / ".." / "shared" / "data" / "real" / "eurosat_ms_1pct").resolve()


@pytest.mark.real
@pytest.mark.skipif(not EUROSAT.is_dir(), reason="../shared/data/real/eurosat_ms_1pct missing")
def test_eurosat_bands_are_named_by_what_they_hold() -> None:
    from pipeline.train.probe import load_eurosat

    data = load_eurosat(EUROSAT)
    bands = {b: data.images[:, i].reshape(-1).astype(np.float64)
             for i, b in enumerate(data.band_names)}
    # B8A (narrow NIR, 865 nm) follows B08 (broad NIR) pixel by pixel; B09 (water vapour)
    # and B10 (cirrus, near-black over land) do not
    assert np.corrcoef(bands["B08"], bands["B8A"])[0, 1] > 0.95
    assert np.corrcoef(bands["B08"], bands["B09"])[0, 1] < 0.9
    assert bands["B10"].mean() < 100 < bands["B09"].mean()


# ------------------------------------------------------------------------------ collapse
@pytest.mark.parametrize("method", ["dino", "data2vec"])
def test_teacher_methods_do_not_collapse(store: Path, tmp_path: Path, method: str) -> None:
    # DINO and data2vec regress an EMA teacher: the trivial solution is one output for every
    # image. After a short run with the learning benchmark's settings (fast EMA), the
    # features of fresh views must still spread like those of random weights.
    learning = _learning_module()
    from pipeline.train.engine import pretrain
    from pipeline.train.export import load_backbone, random_backbone, spec_from_file
    from pipeline.train.probe import extract_features

    rec = learning.RECIPES[method]
    kwargs = dict(rec["method_kwargs"])
    if method == "dino":
        kwargs.update(out_dim=256, hidden_dim=64, bottleneck_dim=32)
    cfg = small_config(method, str(store), str(tmp_path / method), arch=rec["arch"],
                       crop_size=32, batch_size=6, epochs=2, repeats=4, lr=rec["lr"] * 256 / 6
                       if method == "dino" else rec["lr"], warmup_epochs=0.2, progress=False,
                       log_every=0, method_kwargs=kwargs)
    summary = pretrain(cfg)
    losses = [x for h in summary["history"] for x in h["losses"]]
    assert len(losses) == 8 and all(np.isfinite(losses))
    model, _ = load_backbone(summary["weights"])
    ds = build_dataset(small_config("mae", str(store), "unused", crop_size=32).resolved())
    images = torch.stack([ds[i]["image"] for i in range(len(ds))] * 2)
    images[len(ds):] = images[len(ds):].flip(-1)
    trained = feature_spread(extract_features(model, images, image_size=32))
    rand = feature_spread(extract_features(random_backbone(spec_from_file(summary["weights"]), 0),
                                           images, image_size=32))
    assert trained > 0.5 * rand, (trained, rand)


# --------------------------------------------------------------------- the benchmark store
def test_learning_store_tiles_the_real_scenes_of_the_seasons_year(tmp_path: Path) -> None:
    # items shaped as the embedded catalog writes them: a real Major-TOM cell (1,068 px of
    # 10 m in UTM 33N), the same cell dated another year, and a synthetic scene
    import json

    from pipeline.sampling import locations_from_points

    items = tmp_path / "catalog" / "items" / "sentinel-2-l2a"
    items.mkdir(parents=True)
    bbox = [819627.364339148, -340.0, 830307.364339148, 10340.0]
    for name, when, source in (("real", "2022-07-06T08:56:11Z", "Major-TOM Core-S2L2A"),
                               ("old", "2020-07-06T08:56:11Z", "Major-TOM Core-S2L2A"),
                               ("fake", "2022-07-06T08:56:11Z", "synthetic (seed 0)")):
        (items / f"{name}.json").write_text(json.dumps({
            "id": name, "properties": {"datetime": when, "ssl4eo:source": source,
                                       "proj:epsg": 32633},
            "assets": {"B04": {"proj:bbox": bbox, "proj:shape": [1068, 1068]}}}))
    pts = _learning_module().real_patch_centres(tmp_path / "catalog", 2022)
    assert len(pts) == 16 and {p[2] for p in pts} == {"real"}
    locs = locations_from_points(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    assert len(locs) == 16  # none overlaps another (an overlapping point would be dropped)
    assert (locs["epsg"] == 32633).all()
    assert (locs["xmin"] >= bbox[0]).all() and (locs["xmax"] <= bbox[2]).all()
    assert (locs["ymin"] >= bbox[1]).all() and (locs["ymax"] <= bbox[3]).all()
