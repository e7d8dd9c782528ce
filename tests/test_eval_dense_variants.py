"""Dense-protocol variants of zero-shot segmentation (issue 18): MaskCLIP / SCLIP / NACLIP
last blocks on the native, timm and open_clip ViT towers against naive float64 re-implementations
written from the papers' equations, sliding-window inference, chance mIoU, the protocol card and
the VOC / COCO-Stuff / ADE20K folder loaders on fixtures in the real layouts."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from finegrain.encoders import ImageTowerConfig, build_image_tower
from finegrain.encoders import timm_tower as timm_tower_module
from finegrain.encoders.dense import dense_variant, gaussian_window
from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.containers import load_mask
from finegrain.eval.datasets import load_task_data
from finegrain.eval.seg_formats import COCO_STUFF_UNUSED
from finegrain.eval.segmentation import (
    chance_metrics,
    evaluate_segmentation,
    seg_metrics,
    window_starts,
)

from helpers.eval_toy import COLORS, ToyMethod

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
VARIANTS = ("maskclip", "sclip", "naclip")


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    path = tmp_path_factory.mktemp("oc") / "fg-dense-tiny.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(path)
    yield "fg-dense-tiny"
    open_clip.factory._MODEL_CONFIGS.pop("fg-dense-tiny", None)


def make_tower(kind: str, monkeypatch, open_clip_name: str = "") -> nn.Module:
    """A tiny float64 tower, parameters perturbed so attention is far from uniform."""
    if kind in ("vit", "vit_qk"):
        # vit_qk: GRAIN's layout (per-head q/k LayerNorm, as the grain_vitb16 recipe)
        layout = dict(qk_norm=True, norm_eps=1e-6, ln_pre=False, patch_bias=True)
        cfg = ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=2,
                               heads=2, **(layout if kind == "vit_qk" else {}))  # fmt: skip
    elif kind == "timm":
        from timm.models.vision_transformer import VisionTransformer

        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
        args.update(dynamic_img_size=True, reg_tokens=2, qk_norm=True, init_values=0.5)
        monkeypatch.setattr(
            timm_tower_module, "_create", lambda n, s, *_: VisionTransformer(**args)
        )
        cfg = ImageTowerConfig(name="timm", model="vit_tiny_patch16_224", image_size=32)
    else:
        cfg = ImageTowerConfig(name="open_clip", model=open_clip_name, image_size=32)
    tower = build_image_tower(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return tower


def block_pieces(tower: nn.Module):
    """(blocks, final norm, prefix count) of each library's tower."""
    if hasattr(tower, "model"):
        return list(tower.model.blocks), tower.model.norm, 3
    if hasattr(tower, "visual"):
        return list(tower.visual.transformer.resblocks), tower.visual.ln_post, 1
    return list(tower.transformer.blocks), tower.ln_post, 1


def unpack(blk: nn.Module):
    """ln1, W_qkv, b_qkv, heads, q/k norm, out projection, ln2, mlp, layer scales of a block."""
    ident = lambda z: z  # noqa: E731
    if hasattr(blk, "norm1"):  # timm
        a = blk.attn
        out = lambda o: a.proj(a.norm(o))  # noqa: E731
        return (blk.norm1, a.qkv.weight, a.qkv.bias, a.num_heads, a.q_norm, a.k_norm, out,
                blk.norm2, blk.mlp, blk.ls1, blk.ls2)  # fmt: skip
    if hasattr(blk.attn, "in_proj_weight"):  # open_clip
        a = blk.attn
        return (blk.ln_1, a.in_proj_weight, a.in_proj_bias, a.num_heads, ident, ident,
                a.out_proj, blk.ln_2, blk.mlp, blk.ls_1, blk.ls_2)  # fmt: skip
    a = blk.attn
    qn, kn = (ident if isinstance(n, nn.Identity) else functools.partial(naive_ln, n)
              for n in (a.q_norm, a.k_norm))  # fmt: skip
    return (blk.ln_1, a.qkv.weight, a.qkv.bias, a.heads, qn, kn, a.proj, blk.ln_2,
            blk.mlp, ident, ident)  # fmt: skip


def naive_ln(norm: nn.LayerNorm, z: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension from its formula, with ``norm``'s affine and eps."""
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_last_block(blk, x, variant: str, grid, prefix: int, std: float, block: str):
    """Patch outputs of the last block written from the equations, one head and one token
    pair at a time in float64 (the Gaussian from its formula, not from a matrix helper)."""
    ln1, w, b, heads, qn, kn, out, ln2, mlp, ls1, ls2 = unpack(blk)
    y = ln1(x)[0]  # (T, D)
    t, a = y.shape[0], w.shape[0] // 3
    dh = a // heads
    qkv = y @ w.t() + b  # (T, 3A)
    heads_out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        q = qn(qkv[:, :a][:, sl][None, None])[0, 0]
        k = kn(qkv[:, a : 2 * a][:, sl][None, None])[0, 0]
        v = qkv[:, 2 * a :][:, sl]
        s = dh**-0.5
        if variant == "maskclip":
            heads_out.append(v)
            continue
        if variant == "sclip":
            attn = torch.softmax(q @ q.t() * s, -1) + torch.softmax(k @ k.t() * s, -1)
        else:
            logits = k @ k.t() * s
            for i in range(prefix, t):
                for j in range(prefix, t):
                    (ri, ci), (rj, cj) = divmod(i - prefix, grid[1]), divmod(j - prefix, grid[1])
                    d2 = (ri - rj) ** 2 + (ci - cj) ** 2
                    logits[i, j] = logits[i, j] + math.exp(-d2 / (2 * std**2))
            attn = torch.softmax(logits, -1)
        heads_out.append(attn @ v)
    o = out(torch.cat(heads_out, -1)[None])  # (1, T, D)
    residual = {"released": variant != "naclip", "attention_only": False, "residual_ffn": True}
    if residual[block]:
        o = x + ls1(o)
        o = o + ls2(mlp(ln2(o)))
    return o[:, prefix:]


@pytest.mark.parametrize("kind", ["vit", "vit_qk", "timm", "open_clip"])
def test_variants_match_naive_last_block(kind, monkeypatch, open_clip_tiny):
    tower = make_tower(kind, monkeypatch, open_clip_tiny)
    blocks, norm, prefix = block_pieces(tower)
    x = torch.randn(1, 3, 32, 40, dtype=torch.float64)  # a 4 x 5 grid
    seen = []
    hook = blocks[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        plain = tower(x)  # the input of the last block, from the tower's own plain run
        hook.remove()
        h = seen[0]
        outs = {}
        for variant in VARIANTS:
            for block in ("released", "attention_only", "residual_ffn"):
                with dense_variant(tower, variant, gaussian_std=1.5, block=block):
                    got = tower(x)
                want = norm(naive_last_block(blocks[-1], h, variant, (4, 5), prefix, 1.5, block))
                torch.testing.assert_close(got.tokens, want, rtol=1e-9, atol=1e-9)
                # the CLS / pooled output stays the model's own
                torch.testing.assert_close(got.pooled, plain.pooled, rtol=1e-12, atol=1e-12)
                outs[variant, block] = got.tokens
    assert getattr(tower, "dense_mode", None) is None  # switched back after the with
    torch.testing.assert_close(tower(x).tokens, plain.tokens, rtol=1e-12, atol=1e-12)
    # released = residual_ffn for MaskCLIP / SCLIP, = attention_only for NACLIP ("reduced")
    for v in VARIANTS:
        same = "attention_only" if v == "naclip" else "residual_ffn"
        torch.testing.assert_close(outs[v, "released"], outs[v, same], rtol=0, atol=0)
    distinct = [outs[v, b] for v in VARIANTS for b in ("attention_only", "residual_ffn")]
    distinct.append(plain.tokens)
    for i, a in enumerate(distinct):  # every variant changes the patch features
        assert not any(torch.allclose(a, b) for b in distinct[i + 1 :]), i


def test_gaussian_window_and_refusals():
    w = gaussian_window((2, 3), 2.0)
    assert w.shape == (6, 6) and torch.allclose(w.diagonal(), torch.ones(6, dtype=w.dtype))
    assert w[0, 5].item() == pytest.approx(math.exp(-(1 + 4) / 8))
    with pytest.raises(ValueError, match="does not support dense_variant='sclip'"):
        with dense_variant(nn.Linear(2, 2), "sclip"):
            pass
    with pytest.raises(ValueError, match="unknown dense_variant 'clearclip'"):
        with dense_variant(nn.Linear(2, 2), "clearclip"):
            pass
    task = EvalTaskConfig(task="segmentation", num_samples=2, dense_variant="naclip")
    ctx = EvalContext.create(ToyMethod(), progress=False)
    with pytest.raises(ValueError, match="has no image tower whose last block"):
        evaluate_segmentation(ctx, task, load_task_data(task, 32))


def tiny_clip():
    from finegrain.methods.clip import CLIP, CLIPConfig
    from finegrain.recipes.base import tiny_towers

    torch.manual_seed(0)
    return CLIP(CLIPConfig(**tiny_towers(width=32, depth=2, heads=2), embed_dim=16)).eval()


def test_window_grid_and_one_window_equals_plain():
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(100, 64, 32) == [0, 32, 36]  # last window flush with the border
    assert window_starts(96, 64, 16) == [0, 16, 32]
    m = tiny_clip()
    base = {"task": "segmentation", "num_samples": 4, "templates": "plain", "num_examples": 4}
    ctx = EvalContext.create(m, progress=False)
    plain = EvalTaskConfig(**base)
    data = load_task_data(plain, 64)  # synthetic scenes at the model size: square, 64 px
    got_plain, art_plain = evaluate_segmentation(ctx, plain, data)
    one = EvalTaskConfig(**base, slide_size=64)
    got_one, art_one = evaluate_segmentation(ctx, one, data)
    assert got_one == got_plain
    for a, b in zip(art_one["preds"], art_plain["preds"]):
        np.testing.assert_array_equal(a, b)
    many = EvalTaskConfig(**base, slide_size=96, slide_stride=16)
    got_many, art = evaluate_segmentation(ctx, many, data)
    assert art["protocol"]["slide"] == {"short_side": 96, "window": 64, "stride": 16}
    assert got_many != got_plain
    with pytest.raises(ValueError, match="slide_size=32 is smaller than the 64-pixel window"):
        evaluate_segmentation(ctx, EvalTaskConfig(**base, slide_size=32), data)
    with pytest.raises(ValueError, match="slide_stride=80 must lie in"):
        evaluate_segmentation(ctx, EvalTaskConfig(**base, slide_size=96, slide_stride=80), data)


def test_chance_miou_by_hand():
    conf = torch.tensor([[0, 0, 0], [5, 3, 2], [1, 1, 8]])  # rows: ground truth 0, 1, 2
    # no background: predictions uniform over labels 1, 2 (K = 2); background rows ignored
    got = chance_metrics(conf, 2, ignore_bg=True)
    n1, n2, n = 10, 10, 20  # gt pixels of classes 1, 2 (background row dropped)
    iou = [(c / 2) / (c + n / 2 - c / 2) for c in (n1, n2)]
    assert got["miou"] == pytest.approx(sum(iou) / 2)
    assert got["pixel_accuracy"] == pytest.approx(0.5)
    # with background as class 0 over all three labels (K = 3)
    conf = torch.tensor([[6, 0, 0], [5, 3, 2], [1, 1, 8]])
    got = chance_metrics(conf, 3, ignore_bg=False)
    rows, n = [6, 10, 10], 26
    want = sum((r / 3) / (r + n / 3 - r / 3) for r in rows) / 3
    assert got["miou"] == pytest.approx(want)
    assert seg_metrics(conf, False)["miou"] > got["miou"]


def test_variants_end_to_end_protocol():
    m = tiny_clip()
    base = {"task": "segmentation", "num_samples": 4, "templates": "plain", "batch_size": 4}
    tasks = [EvalTaskConfig(**base, dense_variant=v) for v in ("raw", *VARIANTS)]
    res = run_tasks(m, tasks, progress=False)
    mious = [res[f"segmentation/synthetic{'/' + v if v != 'raw' else ''}/miou"]
             for v in ("raw", *VARIANTS)]  # fmt: skip
    assert len(set(mious)) == 4, mious  # the variants give different predictions
    ctx = EvalContext.create(m, progress=False)
    cfg = EvalTaskConfig(**base, dense_variant="naclip", gaussian_std=3.0)
    _, art = evaluate_segmentation(ctx, cfg, load_task_data(cfg, 64))
    p = art["protocol"]
    assert p["dense_variant"] == "naclip" and p["gaussian_std"] == 3.0
    assert p["dense_block"] == "released" and p["n_images"] == 4
    assert p["inference"] == "whole:squash" and 0 < p["chance"]["miou"] < 1
    json.dumps(p)


# ---- folder loaders on fixtures in the datasets' own layouts --------------------------------
def _img(path, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(path, format="JPEG")


def _png(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), "L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def test_voc_loader(tmp_path):
    arr = np.array([[0, 15, 255], [1, 20, 0]])
    for i in ("2007_000001", "2007_000002"):
        _img(tmp_path / "JPEGImages" / f"{i}.jpg")
        _png(tmp_path / "SegmentationClass" / f"{i}.png", arr, palette=True)
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    cfg = EvalTaskConfig(task="segmentation", dataset="voc", path=str(tmp_path), split="val")
    d = load_task_data(cfg)
    assert [p.stem for p in d.images] == ["2007_000002"] and len(d.classnames) == 20
    assert load_mask(d.masks[0]).tolist() == arr.tolist()  # palette indices, not colours


def test_coco_stuff_loader_train_ids_and_raw_maps(tmp_path):
    train_ids = np.array([[0, 170, 255], [91, 12, 5]])
    _img(tmp_path / "images" / "val2017" / "000000000139.jpg")
    _png(tmp_path / "annotations" / "val2017" / "000000000139_labelTrainIds.png", train_ids)
    cfg = EvalTaskConfig(task="segmentation", dataset="coco_stuff", path=str(tmp_path), split="val")
    d = load_task_data(cfg)
    assert len(d.classnames) == 171 and d.classnames[0] == "person" and d.classnames[-1] == "wood"
    assert load_mask(d.masks[0]).tolist() == [[1, 171, 255], [92, 13, 6]]
    raw_dir = tmp_path / "raw"
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED]
    raw = np.array([[0, 12, 181], [255, 11, 26]])  # 11: an unused thing id -> ignore
    _img(raw_dir / "images" / "val2017" / "1.jpg")
    _png(raw_dir / "annotations" / "val2017" / "1.png", raw)
    d = load_task_data(replace(cfg, path=str(raw_dir)))
    want = [[1, 1 + used.index(12), 171], [255, 255, 1 + used.index(26)]]
    assert load_mask(d.masks[0]).tolist() == want and used.index(12) == 11


def test_ade_loader_ignores_zero_and_reads_object_info(tmp_path):
    ann = np.array([[0, 1, 150], [3, 0, 2]])
    _img(tmp_path / "images" / "validation" / "ADE_val_00000001.jpg")
    _png(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png", ann)
    cfg = EvalTaskConfig(task="segmentation", dataset="ade20k", path=str(tmp_path), split="val")
    d = load_task_data(cfg)
    assert d.classnames[:3] == ["wall", "building", "sky"] and len(d.classnames) == 150
    assert load_mask(d.masks[0]).tolist() == [[255, 1, 150], [3, 255, 2]]
    rows = ["Idx,Ratio,Train,Val,Name"] + [f"{i},0.1,1,1,name{i};syn" for i in range(1, 151)]
    (tmp_path / "objectInfo150.csv").write_text("\n".join(rows))
    assert load_task_data(cfg).classnames[:2] == ["name1", "name2"]
    with pytest.raises(ValueError, match="no images/training"):
        load_task_data(replace(cfg, split="train"))


def test_ade_fixture_end_to_end(tmp_path):
    """The toy method segments colour squares; ADE's 0 pixels are ignored, never class 0."""
    names = ["red", "green"]
    arr = np.zeros((32, 32, 3), np.uint8)
    ann = np.zeros((32, 32), np.uint8)
    arr[:, :16], ann[:, :16] = COLORS["red"], 1
    arr[:, 16:], ann[:, 16:] = COLORS["green"], 2
    ann[:4] = 0
    (tmp_path / "images" / "validation").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "images" / "validation" / "a.jpg", format="PNG")
    _png(tmp_path / "annotations" / "validation" / "a.png", ann)
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names))
    task = EvalTaskConfig(task="segmentation", dataset="ade20k", path=str(tmp_path),
                          classnames=str(names_file), templates="plain")  # fmt: skip
    res = run_tasks(ToyMethod(), [task], progress=False)
    assert res["segmentation/ade20k/miou"] > 0.9, res
