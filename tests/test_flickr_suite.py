"""The Flickr8k comparison suite (finegrain.bench.flickr): its smoke twin on a handful of real
Flickr8k images (skipped when ../shared/data/flickr8k is absent), the shared text-prefix cache,
chance levels and the non-inferiority verdict."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from finegrain.bench import flickr
from finegrain.bench.flickr_report import chance, non_inferiority
from finegrain.encoders.base import TextTowerConfig
from finegrain.encoders.prefix_cache import shared_text_cache
from finegrain.registry import TEXT_TOWERS

from helpers.numerics import assert_close_scaled


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory, one_thread_module) -> Path:
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
    if not (root / "captions.jsonl").is_file():
        pytest.skip("../shared/data/flickr8k is absent")
    out = tmp_path_factory.mktemp("flickr_quick")
    opts = flickr.SuiteOptions(root, list(flickr.SUITE_METHODS), flickr.QUICK, out, quick=True)
    flickr.run_suite(opts)
    return out


def test_quick_suite_trains_evaluates_and_reports_every_method(quick_suite):
    d = json.loads((quick_suite / "results.json").read_text())
    rows = {(r["method"], r["scoring"]): r for r in d["results"]}
    for m in ("clip", "siglip", "flair", "clippy", "detailclip"):
        r = rows[(m, "global")]
        assert (r["images"], r["texts"]) == (16, 80)  # 16 test images x 5 captions
        for k in ("image_retrieval_recall@1", "text_retrieval_recall@10"):
            assert 0.0 <= r[k] <= 1.0
    assert rows[("flair", "conditioned")]["image_retrieval_recall@5"] >= 0.0
    assert "regions" in rows[("grain", "global")]["na"]  # Flickr8k has no boxes: said why
    assert [c["claim"][:5] for c in d["claims"]] == ["FLAIR", "FLAIR", "FLAIR", "CLIPp", "Detai"]
    assert all(c.get("ci_low") is not None for c in d["claims"])
    md = (quick_suite / "report.md").read_text()
    assert "| *chance* |" in md and "retrieval_flair.png" in md
    assert (quick_suite / "retrieval_flair.png").stat().st_size > 1000
    # the caches were built once for all methods: every test image hit after the first method
    assert d["image_cache"]["hits"] > d["image_cache"]["misses"]


def test_quick_suite_runs_are_normal_run_directories(quick_suite, tmp_path):
    import finegrain
    from finegrain.checkpoint import CONFIG_FILE

    run = quick_suite / "runs" / "flair" / "seed0"
    model, _ = finegrain.load(run)
    assert model.name == "flair"
    text = (run / CONFIG_FILE).read_text()
    assert "flickr8k" in text and "split: test" in text  # `finegrain eval --checkpoint` target
    from finegrain.eval_cli import main

    out = tmp_path / "eval"
    assert main(["--checkpoint", str(run), "--out", str(out), "--quiet"]) == 0
    assert "recall@1" in "".join(p.read_text() for p in out.rglob("*.json"))


def _minilm(trainable: int, lock: bool = True):
    torch.manual_seed(0)
    cfg = TextTowerConfig(name="minilm", context_length=16, trainable_blocks=trainable,
                          lock_frozen=lock)  # fmt: skip
    return TEXT_TOWERS.get("minilm")(cfg).eval()


@pytest.mark.parametrize("trainable", [0, 1])
def test_text_prefix_cache_equals_the_uncached_tower(trainable):
    tower = _minilm(trainable)
    texts = ["a dog runs", "two children play in the snow near a red house .", "a dog runs"]
    ids = tower.tokenizer(texts)
    with torch.no_grad():
        ref = tower(ids)
        with shared_text_cache() as cache:
            first = tower(ids)  # computes (and stores trimmed rows)
            again = tower(ids[[1, 0]])  # read back, zero-filled past the last real token
    assert cache.misses == 3 and cache.hits == 2
    torch.testing.assert_close(first.pooled, ref.pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(again.pooled, ref.pooled[[1, 0]], rtol=1e-5, atol=1e-6)


def test_text_prefix_cache_skips_unlocked_towers():
    tower = _minilm(1, lock=False)
    ids = tower.tokenizer(["a dog runs"])
    with torch.no_grad(), shared_text_cache() as cache:
        tower(ids)
    assert cache.hits == cache.misses == 0  # dropout may be live: never cached


def test_chance_levels():
    assert chance("image_retrieval_recall@1", 1, 1000, 5000) == pytest.approx(1e-3)
    # 3 images, 6 captions (2 right per image), top 2: 1 - C(4,2)/C(6,2) = 0.6
    assert chance("text_retrieval_recall@2", 2, 3, 6) == pytest.approx(0.6)
    assert chance("text_retrieval_recall@1", 1, 1000, 5000) == pytest.approx(5 / 5000)
    assert math.isclose(chance("image_retrieval_recall@10", 10, 5, 25), 1.0)


def test_non_inferiority_verdicts():
    base = {"margin": 0.01, "verdict": "inconclusive"}
    ok = non_inferiority({**base, "ci_low": -0.005, "ci_high": 0.02})
    worse = non_inferiority({**base, "ci_low": -0.05, "ci_high": -0.02})
    unsure = non_inferiority({**base, "ci_low": -0.03, "ci_high": 0.01})
    assert ok["verdict"].startswith("held")
    assert worse["verdict"].startswith("did not hold")
    assert unsure["verdict"].startswith("inconclusive")


def test_suite_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="needs --data"):
        flickr.check_data("")
    with pytest.raises(FileNotFoundError, match="no captions.jsonl"):
        flickr.check_data(tmp_path)
    rows = [{"split": "train", "captions": ["a"], "image": "x.jpg"}]
    assert "regions" in flickr.regions_reason(rows)
    assert flickr.regions_reason([{**rows[0], "regions": [{"box": [0, 0, 1, 1]}]}]) == ""
    b = dataclasses.replace(flickr.QUICK, train_limit=1)
    path = flickr.manifest_for(tmp_path, rows * 3, b, tmp_path / "out")
    assert len(path.read_text().splitlines()) == 1


def test_flair_loss_switches():
    """MPS-only (the suite's ablation): the loss is the MPS loss alone, so the text-conditioned
    pooling gets no gradient; TCS-only keeps the released switch; both off is refused."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_flair_method import sample, tiny_cfg

    from finegrain.methods.flair import FLAIR, _check_config

    with pytest.raises(ValueError, match="keep at least one"):
        _check_config(tiny_cfg(add_tcs_loss=False, add_mps_loss=False))
    sents = [["A red circle.", "A blue square."], ["A green star."], ["Two hearts.", "A cross."]]
    for tcs, mps in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = FLAIR(tiny_cfg(add_tcs_loss=tcs, add_mps_loss=mps)).train()
        out = model(model.make_collate()([sample(i, sentences=s) for i, s in enumerate(sents)]))
        name = "mps_loss" if mps else "tcs_loss"
        assert set(out.losses) == {name}
        torch.testing.assert_close(out.loss, out.losses[name])
        out.loss.backward()
        grad = model.pooling.attn.in_proj_weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == tcs


def test_publish_merges_the_ablation_with_paired_differences(quick_suite, tmp_path):
    from finegrain.bench.flickr_report import publish

    suite = json.loads((quick_suite / "results.json").read_text())
    abl = tmp_path / "ablation"
    abl.mkdir()
    rows = [{**r, "method": "flair_k1"} for r in suite["results"] if r["method"] == "flair"]
    (abl / "results.json").write_text(json.dumps({**suite, "results": rows, "timing": []}))
    report = publish(quick_suite, abl, tmp_path / "docs").read_text()
    line = next(x for x in report.splitlines() if x.startswith("| K = 1 sub-caption"))
    assert "+0.0 [+0.0, +0.0]" in line  # the same model: no difference, a zero-width interval
    lean = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert not any(k.endswith("_per_item") for r in lean["results"] for k in r)
    assert (tmp_path / "docs" / "retrieval_clip.png").is_file()
    other = {**suite["budget"], "image_size": 128}  # an ablation of another budget: refused
    (abl / "results.json").write_text(json.dumps({**suite, "budget": other, "results": rows}))
    with pytest.raises(ValueError, match="another budget .*image_size: 128 vs 64"):
        publish(quick_suite, abl, tmp_path / "docs2")


def test_an_interrupted_training_stops_the_suite(flickr8k_dir, tmp_path, monkeypatch, one_thread):
    """SIGTERM ends the trainer gracefully ('interrupted'); the suite must then stop instead of
    evaluating the half-trained model and starting the next method."""
    from finegrain.train.trainer import Trainer

    rows = flickr.read_rows(flickr8k_dir)
    manifest = flickr.manifest_for(flickr8k_dir, rows, flickr.QUICK, tmp_path)
    cfg = flickr.run_config("clip", flickr.QUICK, flickr8k_dir, manifest)
    monkeypatch.setattr(Trainer, "fit", lambda self: {"status": "interrupted", "step": 1})
    with pytest.raises(SystemExit, match="interrupted at step 1; the suite stops"):
        flickr.train_method(cfg, tmp_path / "run")


def test_tiers_and_budget_overrides(tmp_path):
    """--full tunes Lite0's and MiniLM's last blocks on top of the default's towers; --budget
    and the named options apply on top of the tier; --seeds is refused (one seed per method)."""
    import argparse

    from finegrain.cli import main

    data = tmp_path / "flickr8k"
    data.mkdir()
    (data / "captions.jsonl").write_text("")

    def opts(**kw):
        base = dict(quick=False, full=False, steps=None, image_size=None, device=None,
                    budget=None, methods=None, out=str(tmp_path / "o"), data=str(data),
                    overwrite=False)  # fmt: skip
        return flickr.options_from_args(argparse.Namespace(**{**base, **kw}), []).budget

    default, full = opts(), opts(full=True)
    assert (default.image_size, default.image_pool, default.zero_init_residual) == (
        192,
        "avg",
        True,
    )
    assert (default.bottom_trainable, default.text_trainable) == (0, 0)
    assert full == dataclasses.replace(default, bottom_trainable=3, text_trainable=2)
    assert opts(full=True, steps=7, budget=["text_trainable=1"]).steps == 7
    assert opts(full=True, budget=["text_trainable=1"]).text_trainable == 1
    assert "hybrid (Lite0 to stride 32, Lite0's last 3 blocks tuned" in flickr.tower_description(
        full
    )
    assert main(["demo", "--suite", "flickr8k", "--data", str(data), "--seeds", "2"]) == 2
    cfg = flickr.run_config("detailclip", full, data, data / "captions.jsonl")
    assert cfg.method.views == "tokens", "DetailCLIP's views are cut from the cached bottom"
    assert (cfg.method.image.pool_type, cfg.method.image.zero_init_residual) == ("avg", True)
    assert (cfg.method.image.bottom_trainable, cfg.method.text.trainable_blocks) == (3, 2)


def test_precision_auto_follows_the_hardware(monkeypatch, tmp_path):
    """auto trains in bf16 only where the hardware computes it natively (CPU flags AVX512-BF16 /
    AMX-BF16); explicit values pass through; anything else is one line naming the choices."""
    from finegrain.bench.config import Budget, native_bf16, resolve_precision

    real_read = Path.read_text

    def cpuinfo(flags: str):
        def read(self, *a, **kw):
            if str(self) == "/proc/cpuinfo":
                return f"processor : 0\nflags : fpu sse2 avx2 {flags}\n"
            return real_read(self, *a, **kw)

        return read

    monkeypatch.setattr(Path, "read_text", cpuinfo("avx512f avx512_bf16"))
    assert native_bf16("cpu") and resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(Path, "read_text", cpuinfo("amx_bf16 amx_tile"))
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(Path, "read_text", cpuinfo("avx512f avx512bw"))
    assert not native_bf16("cpu") and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16; got 'fp8'"):
        resolve_precision("fp8", "cpu")
    assert flickr.FlickrBudget().precision == "auto" and flickr.QUICK.precision == "bf16"
    assert Budget().precision == "fp32"  # the scenes suite: its committed reports ran in fp32


def test_depthwise_conv_backward_under_autocast():
    """Lite0's stride-1 depthwise convs (their own backward) train under bf16 autocast: the
    backward runs in the forward's dtype and returns gradients in the parameters' dtypes, close
    to the fp32 ones."""
    from finegrain.encoders.conv_fused import _DepthwiseConv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(8, 1, 5, 5, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    grads = []
    for autocast in (False, True):
        for t in (x, w, b):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = _DepthwiseConv.apply(x, w, b, (2, 2))
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.float().square().sum().backward()
        grads.append([t.grad.clone() for t in (x, w, b)])
    for ref, low in zip(*grads):
        assert low.dtype == torch.float32
        assert_close_scaled(low, ref, rtol=5e-2, atol_rel=5e-2)
