"""CLIPpy: max pooling (gradient routing, naive reference), CLS handling, token sub-sampling
(fraction, determinism, resume), dense features, recipes and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finegrain.heads.pooling import max_pool
from finegrain.methods.base import build_method
from finegrain.methods.clippy import (
    CLIPpy,
    CLIPpyCollate,
    check_keep_fraction,
    num_kept,
    sample_keep,
)
from finegrain.recipes.base import get_recipe


def _naive_max_pool(tokens, mask=None):
    b, n, d = tokens.shape
    out = torch.empty(b, d, dtype=tokens.dtype)
    for i in range(b):
        for c in range(d):
            vals = [tokens[i, j, c].item() for j in range(n) if mask is None or mask[i, j]]
            out[i, c] = max(vals)
    return out


def test_max_pool_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) > 0.4
    mask[:, 0] = True
    torch.testing.assert_close(max_pool(x), _naive_max_pool(x), rtol=0, atol=0)
    torch.testing.assert_close(max_pool(x, mask), _naive_max_pool(x, mask), rtol=0, atol=0)


def test_max_pool_gradient_reaches_only_the_argmax_token():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, generator=g, dtype=torch.float64)
    (max_pool(x) * w).sum().backward()
    arg = x.detach().argmax(dim=1)  # (B, D): the token owning each channel
    want = torch.zeros_like(x)
    for b in range(2):
        for c in range(6):
            want[b, arg[b, c], c] = w[b, c]
    assert torch.equal(x.grad, want)
    assert (x.grad != 0).sum() == 2 * 6  # one token per (image, channel), nothing else


def _tiny(**fields):
    cfg = get_recipe("clippy_smoke").method
    return build_method(dataclasses.replace(cfg, **fields))


def test_encode_image_is_max_over_projected_patches_without_cls():
    torch.manual_seed(0)
    m = _tiny(cls_token="train").eval()
    images = torch.randn(2, 3, 64, 64)
    out = m.image(images)
    want = m.image_proj(out.tokens).amax(dim=1)  # (B, E): patches only, CLS dropped
    torch.testing.assert_close(m.encode_image(images, normalize=False), want)
    dense = m.dense_features(images)  # (B, E, h, w)
    assert dense.shape == (2, m.cfg.embed_dim, 8, 8)
    torch.testing.assert_close(dense.flatten(2).amax(dim=2), want)


@pytest.mark.parametrize("cls_token", ["exclude", "train"])
def test_training_features_pool_cls_only_with_train(cls_token):
    torch.manual_seed(0)
    m = _tiny(cls_token=cls_token).train()
    images = torch.randn(2, 3, 64, 64)
    tokens = m.tokenize(["a red circle", "a blue square"])
    feats = m.features({"image": images, "text": tokens})
    out = m.image(images)
    cands = (
        out.tokens if cls_token == "exclude" else torch.cat([out.pooled[:, None], out.tokens], 1)
    )
    want = torch.nn.functional.normalize(m.image_proj(cands).amax(1), dim=-1)
    torch.testing.assert_close(feats["image"], want)
    assert feats["text"].shape == (2, m.cfg.embed_dim)


def test_bad_config_is_one_line():
    with pytest.raises(ValueError, match=r"token_keep must be in \(0, 1\]"):
        _tiny(token_keep=0.0)
    with pytest.raises(ValueError, match=r"token_keep must be in \(0, 1\]"):
        _tiny(token_keep=1.5)
    with pytest.raises(ValueError, match="valid choices: exclude, train"):
        _tiny(cls_token="always")
    for bad in (float("nan"), -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            check_keep_fraction(bad)


def _samples(n, seed0=0):
    return [{"image": torch.zeros(3, 32, 48), "caption": f"scene {i}", "seed": seed0 + i}
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_collate_keeps_the_configured_fraction(fraction):
    tok = get_recipe("clippy_smoke")  # a tokenizer from the smoke towers
    m = build_method(tok.method)
    coll = CLIPpyCollate(m.text.tokenizer, patch_size=8, keep_fraction=fraction)
    batch = coll(_samples(4))
    n = (32 // 8) * (48 // 8)  # 24 patches
    if fraction == 1.0:
        assert "keep" not in batch
        return
    keep = batch["keep"]
    assert keep.shape == (4, num_kept(n, fraction)) and keep.shape[1] == int(n * fraction + 1e-6)
    for row in keep.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < n
    assert len({tuple(r) for r in keep.tolist()}) > 1, "each sample draws its own keep set"
    again = coll(_samples(4))["keep"]
    assert torch.equal(keep, again), "the keep set is a function of the sample seed"
    assert torch.equal(keep[2:], coll(_samples(4)[2:])["keep"]), "independent of batch mates"
    assert not CLIPpyCollate(m.text.tokenizer, 8, fraction, train=False)(_samples(2)).get("keep")


def test_sample_keep_uses_every_patch_over_many_samples():
    seen = set()
    for s in range(200):
        seen.update(sample_keep(s, 50, 10))
    assert seen == set(range(50))
    assert num_kept(784, 0.2) == 156 and num_kept(3, 0.01) == 1


def test_paper_recipe_changes_only_the_traced_settings():
    """clippy_vitb16_paper is the replication recipe with the paper's CLS rule and token
    sub-sampling at 2x resolution, nothing else (behaviour: tests/test_clippy_released.py)."""
    rep, paper = get_recipe("clippy_vitb16"), get_recipe("clippy_vitb16_paper")

    def flat(cfg):
        d = dataclasses.asdict(cfg)
        d.pop("name")
        for k in ("image_size",):
            d["data"].pop(k)
            d["method"]["image"].pop(k)
        return d, {k: d["method"].pop(k) for k in ("cls_token", "classify_cls", "token_keep")}

    (rest_r, diff_r), (rest_p, diff_p) = flat(rep), flat(paper)
    assert rest_r == rest_p
    assert diff_r != diff_p and paper.data.image_size == 2 * rep.data.image_size
    f8k = get_recipe("clippy_flickr8k")
    clip = get_recipe("clip_flickr8k")
    assert (f8k.method.image, f8k.method.text) == (clip.method.image, clip.method.text)
    assert (f8k.data, f8k.train) == (clip.data, clip.train)


def test_missing_pretrained_paths_fail_clearly(tmp_path):
    cfg = get_recipe("clippy_vitb16").method
    cfg = dataclasses.replace(
        cfg, image=dataclasses.replace(cfg.image, pretrained=str(tmp_path / "x.pth"))
    )
    with pytest.raises(ValueError, match="weights file not found"):
        CLIPpy(cfg)


def test_pretrained_file_of_another_architecture_lists_keys(tmp_path):
    from finegrain.encoders.base import ImageTowerConfig, build_image_tower

    small = ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=3, heads=2)
    torch.save(build_image_tower(small).state_dict(), tmp_path / "other.pt")
    cfg = get_recipe("clippy_smoke").method  # a 2-deep, 64-wide ViT
    cfg = dataclasses.replace(
        cfg, image=dataclasses.replace(cfg.image, pretrained=str(tmp_path / "other.pt"))
    )
    with pytest.raises(ValueError) as e:
        build_method(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "do not fit VisionTransformer" in msg
    assert "unexpected ['transformer.blocks.2." in msg  # the extra third block
    assert "mis-shaped ['class_embedding: (32,) vs (64,)" in msg


@pytest.mark.parametrize("tower", ["vit", "timm"])
def test_token_subsampling_reaches_the_tower(tower):
    pytest.importorskip("timm") if tower == "timm" else None
    from finegrain.encoders.base import ImageTowerConfig

    image = ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=64, depth=2, heads=2)
    if tower == "timm":
        image = ImageTowerConfig(name="timm", model="vit_tiny_patch16_224", image_size=32)
    torch.manual_seed(0)
    m = _tiny(image=image, token_keep=0.5).train()
    p = m.patch_size
    coll = m.make_collate(train=True)
    samples = [
        {"image": torch.randn(3, 64, 64), "caption": f"a red circle {i}", "seed": i}
        for i in range(3)
    ]  # fmt: skip  (2x the tower's 32 px: 4x the patches)
    batch = coll(samples)
    n = (64 // p) ** 2
    assert batch["keep"].shape == (3, n // 2)
    out = m.image(batch["image"], keep=batch["keep"])
    assert out.tokens.shape[1] == n // 2 and out.grid_hw == (64 // p, 64 // p)
    want = torch.nn.functional.normalize(m.image_proj(out.tokens).amax(1), dim=-1)
    torch.testing.assert_close(m.features(batch)["image"], want)
    m.eval()  # inference ignores keep sets: all patches
    full = m.image_proj(m.image(batch["image"]).tokens).amax(1)
    torch.testing.assert_close(
        m.features(batch)["image"], torch.nn.functional.normalize(full, dim=-1)
    )
    assert "keep" not in m.make_collate(train=False)(samples)


def test_efficientnet_rejects_token_keep():
    pytest.importorskip("efficientnet_lite_pytorch")
    from finegrain.encoders.base import ImageTowerConfig

    image = ImageTowerConfig(name="efficientnet_lite0", image_size=64)
    with pytest.raises(ValueError, match="does not support keep="):
        _tiny(image=image, token_keep=0.5)
    with pytest.raises(ValueError, match="need an image tower whose pooled output is a CLS"):
        _tiny(image=image, cls_token="train")


def test_cls_token_train_needs_the_cls_readout():
    """A native ViT that pools with pool_type=avg has no CLS output to add to CLIPPy's pool."""
    from finegrain.encoders.base import ImageTowerConfig

    image = ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=1, heads=2)
    _tiny(image=image, cls_token="train")  # the CLS readout: accepted
    avg = dataclasses.replace(image, pool_type="avg")
    with pytest.raises(ValueError, match="pool_type=avg"):
        _tiny(image=avg, cls_token="train")


class _Crash:
    """Wraps a train loader and raises after ``after`` batches (a killed run)."""

    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i == self.after:
                raise RuntimeError("simulated crash")
            yield b


@pytest.mark.slow
def test_token_subsampling_resume_is_bitwise_exact(tmp_path):
    from finegrain.train.trainer import Trainer

    cfg = get_recipe("clippy_smoke")
    cfg.method = dataclasses.replace(cfg.method, token_keep=0.3)
    cfg.data = dataclasses.replace(cfg.data, batch_size=8, num_workers=0)
    cfg.train = dataclasses.replace(cfg.train, steps=4, checkpoint_every=2, eval_every=0,
                                    progress=False)  # fmt: skip
    cfg.eval = dataclasses.replace(cfg.eval, tasks=[])
    full = Trainer(cfg, output_dir=str(tmp_path / "full"))
    full.fit()
    part = Trainer(cfg, output_dir=str(tmp_path / "part"))
    part.loader = _Crash(part.loader, after=3)  # dies fetching step 4's batch
    with pytest.raises(RuntimeError, match="crash"):
        part.fit()
    again = Trainer(cfg, output_dir=str(tmp_path / "part"), resume="latest")
    assert again.step == 2
    again.fit()
    ref = full.method.state_dict()
    for k, v in again.method.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_features_concatenate_for_exact_accumulation():
    torch.manual_seed(0)
    m = _tiny(token_keep=0.5).train()
    samples = [{"image": torch.randn(3, 64, 64), "caption": f"a blue star {i}", "seed": i}
               for i in range(6)]  # fmt: skip
    batch = m.make_collate(train=True)(samples)
    halves = [{k: v[s] if torch.is_tensor(v) else v for k, v in batch.items()}
              for s in (slice(0, 3), slice(3, 6))]  # fmt: skip
    with torch.no_grad():
        whole = m.features(batch)
        parts = [m.features(h) for h in halves]
    for key in ("image", "text"):
        cat = torch.cat([p[key] for p in parts])
        torch.testing.assert_close(cat, whole[key], rtol=1e-5, atol=1e-6)
    joined = m.loss_from_features({k: torch.cat([p[k] for p in parts]) for k in whole})
    torch.testing.assert_close(joined.loss, m.loss_from_features(whole).loss)


def test_sentence_t5_text_tower_is_mean_pooled(tmp_path):
    """clippy_vitb16's text path: a (tiny, random) T5 encoder directory through the hf tower."""
    transformers = pytest.importorskip("transformers")
    cfg_t5 = transformers.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2)  # fmt: skip
    transformers.T5EncoderModel(cfg_t5).save_pretrained(tmp_path / "st5")
    base = get_recipe("clippy_smoke").method
    text = dataclasses.replace(
        get_recipe("clippy_vitb16").method.text,
        path=str(tmp_path / "st5"),
        grad_checkpointing=False,
        name="hf",
    )  # fmt: skip  (no 2_Dense)
    torch.manual_seed(0)
    m = build_method(dataclasses.replace(base, text=text)).eval()
    ids = torch.tensor([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]])  # T5: </s> = 1, pad = 0
    states = m.text.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    real = (ids != 0).unsqueeze(-1).float()
    mean = (states * real).sum(1) / real.sum(1)  # sentence-transformers mean pooling
    want = torch.nn.functional.normalize(m.text_proj(mean), dim=-1)
    torch.testing.assert_close(m.encode_text(ids), want, rtol=1e-5, atol=1e-6)


def test_paper_recipe_docstring_traces_every_setting_it_makes():
    """Every method field clippy_vitb16_paper sets away from CLIPpyConfig's defaults, and each
    other config group, has a row in its docstring naming a paper section or the project's
    choice (issue 29)."""
    from finegrain.methods.clippy import CLIPpyConfig
    from finegrain.recipes.clippy import clippy_vitb16_paper

    doc = clippy_vitb16_paper.__doc__ or ""
    rows = {line.split("``")[1]: line for line in doc.splitlines() if line.startswith("    ``")}
    cfg, default = get_recipe("clippy_vitb16_paper").method, CLIPpyConfig()
    changed = [f.name for f in dataclasses.fields(cfg)
               if f.name != "name" and getattr(cfg, f.name) != getattr(default, f.name)]  # fmt: skip
    assert {"token_keep", "image", "text", "projection"} <= set(changed)
    named = ["method.cls_token", "method.classify_cls", "data", "train", "eval", "data.image_size"]
    for name in [f"method.{n}" for n in changed] + named:
        key = next((k for k in rows if k == name or k.startswith(name + " ")), None)
        key = key or next((k for k in rows if name.startswith(k.split(" ")[0] + ".")), None)
        assert key, f"{name} has no row in clippy_vitb16_paper's docstring"
    for key, line in rows.items():
        source = line.split("  ")[-1]
        assert "Sec. 3" in source or "project's choice" in source, (key, line)
