"""Pretraining (MoCo-v2, DINO, MAE, data2vec), exact resume, weight export, DDP, CLI, probe.

All on CPU with small backbones (resnet18, vit_tiny_patch16_224) and 32-64 px crops, on a
store written by ``store_fixtures.write_store`` and given texture, so that the views differ.
Torch runs on one thread (the tests share a small machine).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from store_fixtures import store_stats, write_store

from pipeline import layout
from pipeline import transforms as T
from pipeline.cli import main as cli_main
from pipeline.errors import UserError

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pipeline.train.augment import MultiCrop, recipe, split_views  # noqa: E402
from pipeline.train.cli import small_config  # noqa: E402
from pipeline.train.engine import (  # noqa: E402
    CHECKPOINT,
    LOG,
    NonFiniteLossError,
    batch_views,
    build_dataset,
    build_optimizer,
    pretrain,
    seed_everything,
    setup_model,
)
from pipeline.train.export import read_metadata  # noqa: E402
from pipeline.train.probe import (  # noqa: E402
    ProbeData,
    load_eurosat,
    probe,
    select_bands,
    stratified_folds,
    synthetic_probe_data,
)

REPO = Path(__file__).resolve().parents[1]
EUROSAT = (REPO / ".." / "shared" / "data" / "real" / "eurosat_ms_1pct").resolve()
S2 = layout.S2L2A
N_SAMPLES = 16

#: (method, backbone, crop size) covered by every per-method test
CASES = [
    ("moco", "resnet18", 32),
    ("dino", "resnet18", 32),
    ("dino", "vit_tiny_patch16_224", 64),
    ("mae", "vit_tiny_patch16_224", 64),
    ("data2vec", "vit_tiny_patch16_224", 64),
]
IDS = [f"{m}-{a.split('_')[0]}" for m, a, _ in CASES]
#: where each method keeps the student backbone in its state_dict
#: the encoder each method exports: DINO's EMA teacher (the DINO paper's evaluation), else
#: the trained student / query encoder
PREFIX = {"moco": "encoder_q.", "dino": "teacher.", "mae": "encoder.", "data2vec": "student."}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test of this module on one torch thread."""


def _add_texture(path: Path, seed: int = 0) -> None:
    """Overwrite ``bands`` with smooth patterns + noise around the band means; nodata pixels
    (pixel (0, 0) and missing seasons) stay 0."""
    import zarr

    arr = zarr.open_group(str(path), mode="a")[f"{S2}/bands"]
    old = arr[:]
    n, t, b, h, w = old.shape
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty_like(old)
    for s in range(n):
        fx, fy, ph = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6.3)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        for k in range(t):
            for j in range(b):
                amp = 300 + 25 * j + 60 * k
                v = 1500 + j + amp * wave * (1 if j % 3 else -1) + rng.normal(0, 40, (h, w))
                out[s, k, j] = np.clip(v, 1, 60000).astype(np.uint16)
    out[old == 0] = 0
    arr[:] = out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train") / "cube.zarr"
    write_store(path, N_SAMPLES, (S2,), size=48, shard_samples=4,
                missing={S2: [(5, 1), (6, 3)]})
    _add_texture(path)
    return path


def _kw(arch: str, crop: int, **more):
    return dict(arch=arch, crop_size=crop, batch_size=4, epochs=2, max_steps_per_epoch=2,
                progress=False, log_every=1, **more)


def _assert_same(a, b, path: str = "") -> None:
    """Recursive exact equality of checkpoint contents (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _timm_load(weights: Path, arch: str, crop: int) -> torch.nn.Module:
    kwargs = {"img_size": crop} if arch.startswith("vit_") else {}
    model = timm.create_model(arch, pretrained=False, in_chans=12, num_classes=0, **kwargs)
    model.load_state_dict(safetensors_torch.load_file(str(weights)), strict=True)
    return model


# ------------------------------------------------------------------ train, resume, export
@pytest.mark.parametrize(("method", "arch", "crop"), CASES, ids=IDS)
def test_steps_resume_and_export(store: Path, tmp_path: Path, method: str, arch: str,
                                 crop: int) -> None:
    straight = pretrain(small_config(method, str(store), str(tmp_path / "a"), **_kw(arch, crop)))
    assert straight["steps"] == 4 and straight["epochs"] == 2
    losses = [v for h in straight["history"] for v in h["losses"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses

    first = pretrain(small_config(method, str(store), str(tmp_path / "b"),
                                  **_kw(arch, crop, stop_after=1)))
    assert first["epochs"] == 1 and first["steps"] == 2
    resumed = pretrain(small_config(method, str(store), str(tmp_path / "b"), **_kw(arch, crop)))
    assert [h["epoch"] for h in resumed["history"]] == [1]
    # the resumed epoch replays the straight run's epoch 1 exactly
    assert resumed["history"][0]["losses"] == straight["history"][1]["losses"]

    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 2
    _assert_same(a["model"], b["model"], "model")
    _assert_same(a["optimizer"], b["optimizer"], "optimizer")
    _assert_same(a["rng"], b["rng"], "rng")

    log = [json.loads(line) for line in (tmp_path / "b" / LOG).read_text().splitlines()]
    assert [r["type"] for r in log if r["type"] in ("start", "resume", "epoch")] == [
        "start", "epoch", "resume", "epoch"]
    assert sum(r["type"] == "step" for r in log) == 4

    weights = Path(straight["weights"])
    model = _timm_load(weights, arch, crop)
    exported = model.state_dict()
    trained = {k[len(PREFIX[method]):]: v for k, v in a["model"].items()
               if k.startswith(PREFIX[method])}
    assert set(exported) == set(trained)
    for k, v in exported.items():
        assert torch.equal(v, trained[k]), k  # the trained encoder, not a fresh model
    if method == "dino":  # the teacher, which the student's steps have moved apart from it
        student = {k[len("student."):]: v for k, v in a["model"].items()
                   if k.startswith("student.")}
        assert any(not torch.equal(v, student[k]) for k, v in exported.items()
                   if v.is_floating_point())
    with torch.no_grad():
        feats = model.eval()(torch.randn(2, 12, crop, crop))
    assert feats.shape == (2, model.num_features) and torch.isfinite(feats).all()
    meta = read_metadata(weights)
    assert meta["arch"] == arch and meta["in_chans"] == 12 and meta["method"] == method
    assert meta["band_names"] == list(layout.BANDS[S2])
    assert meta["norm_mean"] == pytest.approx(store_stats(S2)["mean"])
    assert meta["norm_std"] == pytest.approx(store_stats(S2)["std"])
    assert meta["s2_offset"] == 1000
    # the resumed run exports the same weights
    other = safetensors_torch.load_file(str(tmp_path / "b" / "backbone.safetensors"))
    for k, v in other.items():
        assert torch.equal(v, exported[k]), k


def test_vit_patch_size_trains_exports_and_loads(store: Path, tmp_path: Path) -> None:
    from pipeline.train.export import load_backbone, spec_from_file

    cfg = small_config("mae", str(store), str(tmp_path / "p8"),
                       **_kw("vit_tiny_patch16_224", 32, patch_size=8))
    weights = Path(pretrain(cfg)["weights"])
    spec = spec_from_file(weights)
    assert (spec.img_size, spec.patch_size) == (32, 8)
    model = timm.create_model("vit_tiny_patch16_224", in_chans=12, num_classes=0, img_size=32,
                              patch_size=8)
    model.load_state_dict(safetensors_torch.load_file(str(weights)), strict=True)
    loaded, _ = load_backbone(weights)
    assert loaded.patch_embed.num_patches == 16  # (32 / 8) ** 2 tokens, not (32 / 16) ** 2
    for bad, message in (({"arch": "resnet18", "crop_size": 32}, "applies to ViT"),
                         ({"arch": "vit_tiny_patch16_224", "crop_size": 36}, "multiple of")):
        with pytest.raises(UserError, match=message):
            small_config("mae", str(store), "unused", patch_size=8, **bad).resolved()


# ------------------------------------------------------------------- learning signal
@pytest.mark.parametrize(("method", "arch", "crop"), CASES, ids=IDS)
def test_loss_decreases_on_a_fixed_batch(store: Path, method: str, arch: str, crop: int) -> None:
    # DINO's loss is a cross-entropy to a moving target (EMA teacher, centring), which need not
    # fall step by step; with teacher and centre held still, the student must fit the target.
    frozen = {"momentum_teacher": 1.0, "center_momentum": 1.0} if method == "dino" else {}
    cfg = small_config(method, str(store), "unused", arch=arch, crop_size=crop, batch_size=8,
                       method_kwargs=frozen).resolved()
    seed_everything(0)
    dataset = build_dataset(cfg)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    views = batch_views(batch)
    model = setup_model(cfg, dataset.num_bands, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg, cfg.lr)

    def loss_now() -> float:
        torch.manual_seed(123)  # same masks for MAE / data2vec
        with torch.no_grad():
            return float(model(views))

    before = loss_now()
    for step in range(8):
        loss = model(views)
        optimizer.zero_grad()
        loss.backward()
        model.on_after_backward(1)
        optimizer.step()
        model.after_step(step + 1, 100)
    after = loss_now()
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.97 * before, (before, after)


# ---------------------------------------------------------------------------- failures
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_non_finite_loss_stops_the_run(tmp_path: Path) -> None:
    import zarr

    path = write_store(tmp_path / "bad.zarr", 8, (S2,), size=32, shard_samples=4)
    root = zarr.open_group(str(path), mode="a")
    stats = store_stats(S2)
    stats["std"] = [1e-38] * len(stats["std"])  # corrupt statistics: inputs overflow to inf
    root.attrs[layout.ATTR_STATS] = {S2: stats}
    cfg = small_config("mae", str(path), str(tmp_path / "run"), crop_size=32, batch_size=4,
                       epochs=1, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf).*before applying"):
        pretrain(cfg)
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_ddp_two_processes_gloo(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", "-m", "pipeline.cli", "pretrain", "--method", "moco",
           "--store", str(store), "--size", "small", "--crop-size", "32", "--batch-size", "4",
           "--epochs", "2", "--device", "cpu", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # 16 samples / (4 per rank x 2 ranks) = 2 steps per epoch; keys of both ranks enqueued
    assert ckpt["step"] == 4
    assert int(ckpt["model"]["queue_ptr"]) == 4 * 8
    start = json.loads((out / LOG).read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["global_batch"] == 8
    _timm_load(out / "backbone.safetensors", "resnet18", 32)
    assert "weights:" in proc.stdout and proc.stdout.count("weights:") == 1  # rank 0 only


# --------------------------------------------------------------------------------- CLI
def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command, words in (("pretrain", ["--method", "--store", "torchrun", "--resume"]),
                           ("probe", ["--weights", "--data", "--folds", "--catalog"])):
        with pytest.raises(SystemExit) as exc:
            cli_main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for w in words:
            assert w in out, (command, w)


def test_cli_pretrain_runs_and_reports_bad_options(store: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["pretrain", "--method", "mae", "--store", str(store), "--queue-size", "64"])
    assert rc == 2 and "--queue-size applies to moco only" in capsys.readouterr().err
    rc = cli_main(["pretrain", "--method", "moco", "--store", str(tmp_path / "nope.zarr"),
                   "--out", str(tmp_path / "x")])
    assert rc == 2 and "ssl4eo build" in capsys.readouterr().err
    rc = cli_main(["pretrain", "--method", "moco", "--store", str(store), "--size", "small",
                   "--batch-size", "4", "--queue-size", "10", "--out", str(tmp_path / "q")])
    assert rc == 2 and "not a multiple of the global batch 4" in capsys.readouterr().err
    out = tmp_path / "cli"
    rc = cli_main(["pretrain", "--method", "data2vec", "--store", str(store), "--size", "small",
                   "--crop-size", "32", "--batch-size", "4", "--epochs", "1",
                   "--max-steps-per-epoch", "2", "--mask-ratio", "0.5", "--layer-norm-targets",
                   "--out", str(out), "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["arch"] == "vit_tiny_patch16_224"
    start = json.loads((out / LOG).read_text().splitlines()[0])
    assert start["config"]["method_kwargs"] == {"mask_fraction": 0.5, "layer_norm_targets": True}
    _timm_load(Path(summary["weights"]), "vit_tiny_patch16_224", 32)
    # a second call resumes: nothing left to do
    rc = cli_main(["pretrain", "--method", "data2vec", "--store", str(store), "--size", "small",
                   "--crop-size", "32", "--batch-size", "4", "--epochs", "1", "--out", str(out),
                   "--no-progress"])
    assert rc == 0 and "nothing to do" in capsys.readouterr().out


def test_data2vec_targets_are_normalised_per_block_and_optionally_per_token() -> None:
    from pipeline.train.backbones import BackboneSpec
    from pipeline.train.methods import Data2Vec

    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", in_chans=3, img_size=32, patch_size=8)
    imgs = torch.randn(2, 3, 32, 32)
    # block outputs (of unit scale at initialisation: the FFN outputs' tiny variance would
    # meet the instance norm's epsilon)
    plain = Data2Vec(spec, top_k=1, target_layer="block")
    t = plain.targets(imgs)  # one block: its instance norm, each channel over the 16 tokens
    assert t.shape == (2, 16, plain.student.embed_dim)
    assert t.mean(dim=1).abs().max() < 1e-4
    assert torch.allclose(t.var(dim=1, unbiased=False), torch.ones(2, t.shape[-1]), atol=1e-3)
    assert t.std(dim=2).sub(1).abs().max() > 0.05  # per token, the channels' scale is uneven
    ln = Data2Vec(spec, top_k=3, layer_norm_targets=True, target_layer="block")
    ln.load_state_dict(plain.state_dict())
    u = ln.targets(imgs)
    assert u.mean(dim=2).abs().max() < 1e-4  # each token over its features
    assert torch.allclose(u.var(dim=2, unbiased=False), torch.ones(2, 16), atol=1e-3)
    assert torch.isfinite(ln([imgs])) and not torch.allclose(u, t)


def test_data2vec_targets_are_the_ffn_outputs_before_the_last_residual() -> None:
    """The paper's target layer: each target block's feed-forward output before the block's
    last residual connection ("ffn", the default), not the block's output ("block")."""
    import torch.nn.functional as F

    from pipeline.errors import UserError
    from pipeline.train.backbones import BackboneSpec
    from pipeline.train.methods import Data2Vec

    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", in_chans=3, img_size=32, patch_size=8)
    imgs = torch.randn(2, 3, 32, 32)
    ffn = Data2Vec(spec, top_k=1)
    block = Data2Vec(spec, top_k=1, target_layer="block")
    block.load_state_dict(ffn.state_dict())
    seen = {}
    hooks = [ffn.teacher.blocks[-1].mlp.register_forward_hook(
                 lambda m, i, o: seen.__setitem__("mlp", o)),
             block.teacher.blocks[-1].register_forward_hook(
                 lambda m, i, o: seen.__setitem__("block", o))]
    try:
        t_ffn, t_block = ffn.targets(imgs), block.targets(imgs)
    finally:
        for h in hooks:
            h.remove()

    def inorm(y: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(y[:, 1:].float().transpose(1, 2)).transpose(1, 2)

    assert torch.allclose(t_ffn, inorm(seen["mlp"]), atol=1e-5)
    assert torch.allclose(t_block, inorm(seen["block"]), atol=1e-5)
    assert not torch.allclose(t_ffn, t_block, atol=1e-2)
    with pytest.raises(UserError, match="target_layer"):
        Data2Vec(spec, target_layer="attn")


def test_data2vec_masks_rectangles_of_patches_as_beit() -> None:
    """The paper's masking (BEiT's block-wise): about the share of the grid, in rectangles, so
    a masked patch's neighbours are masked far more often than with patches drawn at random;
    a seeded run masks alike."""
    import torch.nn.functional as F

    from pipeline.errors import UserError
    from pipeline.train.backbones import BackboneSpec
    from pipeline.train.methods import Data2Vec, block_mask

    def neighbours_masked(m: torch.Tensor) -> float:  # share of masked 4-neighbours
        m = m.float()
        pad = F.pad(m, (1, 1, 1, 1))
        masked = pad[:-2, 1:-1] + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:]
        inside = F.pad(torch.ones_like(m), (1, 1, 1, 1))
        around = inside[:-2, 1:-1] + inside[2:, 1:-1] + inside[1:-1, :-2] + inside[1:-1, 2:]
        return float((masked * m).sum() / (around * m).sum())

    torch.manual_seed(0)
    blocks = [block_mask((8, 8), 39) for _ in range(100)]
    counts = [int(b.sum()) for b in blocks]
    assert max(counts) == 39 and min(counts) >= 33 and sum(counts) / 100 > 38
    assert all(b.shape == (8, 8) and b.dtype == torch.bool for b in blocks)
    spec = BackboneSpec("vit_tiny_patch16_224", in_chans=3, img_size=32, patch_size=8)
    random_masks = Data2Vec(spec, masking="random")._mask(100, (8, 8), torch.device("cpu"))
    block_share = sum(neighbours_masked(b) for b in blocks) / 100
    random_share = sum(neighbours_masked(r.view(8, 8)) for r in random_masks) / 100
    assert block_share > 0.8 and random_share < 0.7, (block_share, random_share)
    torch.manual_seed(1)
    a = block_mask((14, 14), 120)
    torch.manual_seed(1)
    assert torch.equal(a, block_mask((14, 14), 120)) and 110 <= int(a.sum()) <= 120
    d2v = Data2Vec(spec, top_k=2)  # the default: block masking, on a 4 x 4 grid here
    assert d2v.masking == "block" and torch.isfinite(d2v([torch.randn(2, 3, 32, 32)]))
    with pytest.raises(UserError, match="masking"):
        Data2Vec(spec, masking="tube")


# ------------------------------------------------------------------------------- probe
@pytest.fixture(scope="module")
def weights(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe-weights")
    summary = pretrain(small_config("moco", str(store), str(out), crop_size=32, batch_size=4,
                                    epochs=1, max_steps_per_epoch=2, progress=False))
    return Path(summary["weights"])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-tile embedded catalog (Halle, 7.68 km, one S2 scene per season) with labels,
    written by the synthetic scene generator in the catalog's layout."""
    from pipeline.demo.cities import DEMO_CITIES
    from pipeline.demo.stacmeta import item_path
    from pipeline.demo.synthetic import TEST_SCENE_HALF_WIDTH_M, city_tiles, render_tile

    out = tmp_path_factory.mktemp("catalog")
    (out / "catalog.json").write_text(json.dumps({
        "type": "Catalog", "id": "probe-test", "stac_version": "1.0.0",
        "description": "one synthetic tile", "links": []}))
    tile = city_tiles(DEMO_CITIES[0], TEST_SCENE_HALF_WIDTH_M)[0]
    for item in render_tile(tile, out, seed=0, s2_per_season=1, s1_per_season=0):
        p = item_path(out, item["collection"], item["id"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(item))
    return out


@pytest.mark.parametrize("method", ["moco", "dino", "mae", "data2vec"])
def test_recipes_are_built_from_pipeline_transforms(method: str) -> None:
    views = recipe(method, 32, n_local=3)
    assert len(views) == {"moco": 2, "dino": 3}.get(method, 1)
    for v in views:
        assert isinstance(v, (T.Compose, MultiCrop)) and v.accepts_generator
    x = torch.randn(13, 40, 40, dtype=torch.float64)
    out = [v(x, generator=torch.Generator().manual_seed(7)) for v in views]
    again = [v(x, generator=torch.Generator().manual_seed(7)) for v in views]
    assert all(torch.equal(a, b) for a, b in zip(out, again))  # a function of the generator
    assert all(o.dtype == torch.float64 and o.shape[-3:-2] == (13,) for o in out)
    if method == "dino":  # two global crops, three stacked local crops of 16 px (96/224 * 32)
        assert out[2].shape == (3, 13, 16, 16)
        flat = split_views([o[None] for o in out])
        assert [tuple(o.shape[-2:]) for o in flat] == [(32, 32)] * 2 + [(16, 16)] * 3
    else:
        assert all(o.shape == (13, 32, 32) for o in out)


def test_brightness_contrast_keeps_bands_and_dtype() -> None:
    t = T.RandomBrightnessContrast(0.4, 0.4)
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6)
    y = t(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    centred = y - y.mean()  # an affine map of the whole image: band differences scale alike
    ratio = centred / (x - x.mean())
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-4)
    assert t(x.to(torch.int16), generator=torch.Generator().manual_seed(0)).dtype == torch.int16
    with pytest.raises(ValueError):
        T.RandomBrightnessContrast(-0.1)


def test_stratified_folds_and_band_selection() -> None:
    labels = np.repeat(np.arange(4), [5, 7, 9, 3])
    folds = stratified_folds(labels, 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    for c, n in enumerate([5, 7, 9, 3]):
        per_fold = [int((labels[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n
    data = ProbeData(np.zeros((2, 13, 4, 4), np.float32), np.array([0, 1]), ["a", "b"],
                     ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                      "B10", "B11", "B12"], 0, "t", "s")
    index, names, missing = select_bands(data, list(layout.BANDS[S2]), 12)
    assert index == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12] and not missing
    index, names, missing = select_bands(data, None, 12)  # no names: drop B10
    assert 10 not in index and "B10" not in names
    index, _, missing = select_bands(data, ["B02", "vv"], 2)
    assert index == [1, None] and missing == ["vv"]


@pytest.mark.real
@pytest.mark.skipif(not EUROSAT.is_dir(), reason="../shared/data/real/eurosat_ms_1pct missing")
def test_probe_eurosat(weights: Path) -> None:
    data = load_eurosat(EUROSAT)
    assert data.images.shape == (270, 13, 64, 64) and len(data.classes) == 10
    result = probe(weights, data=data, folds=5, seed=0)
    assert result["task"] == "eurosat-ms" and result["n_images"] == 270
    assert result["bands"] == list(layout.BANDS[S2]) and not result["missing_bands"]
    assert result["normalisation"] == "weights" and result["s2_offset"] == 1000
    assert result["chance"] == pytest.approx(30 / 270)
    for name in ("pretrained", "random"):
        r = result[name]
        assert set(r) >= {"accuracy_mean", "accuracy_std", "fold_accuracies", "l2"}
        assert len(r["fold_accuracies"]) == 5
        assert all(0.0 <= a <= 1.0 for a in r["fold_accuracies"])
        assert 0.0 <= r["accuracy_mean"] <= 1.0 and r["accuracy_std"] >= 0.0
        # frozen conv features separate EuroSAT classes far better than chance
        assert r["accuracy_mean"] > result["chance"] + 0.1, (name, r)


def test_synthetic_probe_data_matches_labels_and_scenes(catalog: Path) -> None:
    import rasterio
    from rasterio.windows import Window

    from pipeline.demo.synthetic import LANDCOVER_CLASSES

    p = 32
    data = synthetic_probe_data(catalog, patch_size=p, max_per_class=20, seed=0)
    assert data.task == "synthetic-landcover" and data.dn_offset == 1000
    assert data.images.shape[1:] == (12, p, p) and len(data.origins) == len(data)
    assert len(data.classes) >= 3 and set(data.classes) <= set(LANDCOVER_CLASSES)
    assert max(data.class_counts().values()) <= 20
    checked = 0
    for i in range(0, len(data), max(1, len(data) // 6)):
        tile, row, col, item_id = data.origins[i].split(":")
        window = Window(int(col) * p, int(row) * p, p, p)
        with rasterio.open(catalog / "labels" / f"{tile}.tif") as src:
            block = src.read(1, window=window)
        counts = np.bincount(block.ravel(), minlength=len(LANDCOVER_CLASSES))
        assert LANDCOVER_CLASSES[int(counts.argmax())] == data.classes[data.labels[i]]
        item = json.loads((catalog / "items" / "sentinel-2-l2a" / f"{item_id}.json").read_text())
        baseline = item["properties"]["s2:processing_baseline"]
        with rasterio.open(catalog / "assets" / "sentinel-2-l2a" / item_id / "B04.tif") as src:
            b04 = src.read(1, window=window).astype(np.float32)
        offset = 0 if baseline >= "04.00" else 1000
        np.testing.assert_array_equal(data.images[i, 3], b04 + offset)
        checked += 1
    assert checked >= 3


def test_probe_synthetic_when_eurosat_is_absent(weights: Path, catalog: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SSL4EO_REAL_DATA", str(tmp_path / "no-real-data"))
    out = tmp_path / "probe.json"
    rc = cli_main(["probe", "--weights", str(weights), "--catalog", str(catalog), "--folds",
                   "3", "--l2", "0.01", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "EuroSAT-MS not found" in text and "synthetic land cover" in text
    assert "pretrained weights: accuracy" in text and "random weights" in text
    result = json.loads(out.read_text())
    assert result["task"] == "synthetic-landcover" and result["s2_offset"] == 1000
    for name in ("pretrained", "random"):
        assert 0.0 <= result[name]["accuracy_mean"] <= 1.0
        assert result[name]["l2"] == [0.01] * 3
    assert result["random"]["accuracy_mean"] > result["chance"]
    # without weights nor --arch, or without any data, the user is told what to pass
    assert cli_main(["probe", "--catalog", str(catalog)]) == 2
    assert "--weights" in capsys.readouterr().err
    assert cli_main(["probe", "--weights", str(weights)]) == 2
    assert "--catalog DIR" in capsys.readouterr().err


# --------------------------------------------------------------------------- benchmark
def test_benchmark_runs_small_on_cpu() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "train.py"), "--methods", "moco", "mae",
           "--arch", "resnet18", "--vit-arch", "vit_tiny_patch16_224", "--batch-size", "4",
           "--steps", "2", "--warmup", "1", "--crop-size", "32", "--patch-size", "32",
           "--store-samples", "16", "--threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["method"], r["arch"]) for r in results] == [
        ("moco", "resnet18"), ("mae", "vit_tiny_patch16_224")]
    for r in results:
        assert r["in_chans"] == 13 and r["batch_size"] == 4 and r["crop_size"] == 32
        for mode in ("store", "synthetic"):
            assert r[mode]["images_per_s"] > 0 and math.isfinite(r[mode]["loss_last"])
            assert 0.0 <= r[mode]["stall_fraction"] < 1.0 and r[mode]["loader_wait_s"] >= 0
        assert r["store_vs_synthetic"] == pytest.approx(
            r["store"]["images_per_s"] / r["synthetic"]["images_per_s"])
