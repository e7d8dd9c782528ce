"""Hugging Face CLIPModel / SiglipModel folders in (parity with transformers) and runs out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from finegrain.data.tokenizers import ClipTokenizer  # noqa: E402
from finegrain.interop import load_method_spec  # noqa: E402
from finegrain.interop.common import read_scale_bias  # noqa: E402

from helpers.interop import TEXTS, close, hf_clip_reference, hf_siglip_reference, make_run  # noqa: E402


def _features(out: object) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


def _hf_ids(d, length: int) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    return tok(TEXTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")


def test_hf_clip_folder_matches_transformers(tmp_path):
    ref = hf_clip_reference(tmp_path)
    method, cfg = load_method_spec(f"hf:{tmp_path}")
    assert cfg.method.name == "clip" and cfg.method.image.name == "hf_clip"
    ids = method.tokenize(TEXTS)
    ref_ids = _hf_ids(tmp_path, 16)
    assert torch.equal(ids, ref_ids["input_ids"])  # tokenizer ids
    assert torch.equal(ids, ClipTokenizer(16)(TEXTS))  # the written BPE == open_clip's
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert close(
            method.encode_image(x, normalize=False),
            _features(ref.get_image_features(pixel_values=x)),
        )
        assert close(
            method.encode_text(ids, normalize=False), _features(ref.get_text_features(**ref_ids))
        )
        tokens = method.image(x).tokens  # (B, N, D): after the final norm, CLS excluded
        hidden = ref.vision_model(pixel_values=x).last_hidden_state
        assert close(tokens, ref.vision_model.post_layernorm(hidden)[:, 1:])
    assert float(read_scale_bias(method)[0]) == pytest.approx(ref.logit_scale.item())


def test_hf_siglip_folder_matches_transformers_and_exports_back(tmp_path):
    from transformers import SiglipModel

    from finegrain.interop.export import main

    ref = hf_siglip_reference(tmp_path / "src")
    method, cfg = load_method_spec(f"hf:{tmp_path / 'src'}")
    assert cfg.method.name == "siglip" and cfg.data.mean == (0.5, 0.5, 0.5)
    ids = method.tokenize(TEXTS)
    ref_ids = _hf_ids(tmp_path / "src", 16)
    assert torch.equal(ids, ref_ids["input_ids"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img = _features(ref.get_image_features(pixel_values=x))
        txt = _features(ref.get_text_features(input_ids=ref_ids["input_ids"]))
        assert close(method.encode_image(x, normalize=False), img)
        assert close(method.encode_text(ids, normalize=False), txt)
    scale, bias = read_scale_bias(method)
    assert (float(scale), float(bias)) == pytest.approx((1.7, -3.0))
    assert main([f"hf:{tmp_path / 'src'}", "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    back = SiglipModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert close(_features(back.get_image_features(pixel_values=x)), img)
    assert back.logit_bias.item() == pytest.approx(-3.0)


def test_export_hf_clip_from_a_native_run(tmp_path):
    from transformers import CLIPModel

    from finegrain.interop.export import main

    run = make_run(tmp_path / "run", "clip_smoke")
    assert main([str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ours, cfg = load_method_spec(str(run))
    ref = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    length = cfg.method.text.context_length
    ref_ids = _hf_ids(tmp_path / "hf", length)
    ids = ours.tokenize(TEXTS)
    assert torch.equal(ref_ids["input_ids"], ids)  # exported tokenizer == finegrain's
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert close(
            _features(ref.get_image_features(pixel_values=x)), ours.encode_image(x, normalize=False)
        )
        assert close(
            _features(ref.get_text_features(**ref_ids)), ours.encode_text(ids, normalize=False)
        )
    assert ref.logit_scale.item() == pytest.approx(2.5)
    back, _ = load_method_spec(f"hf:{tmp_path / 'hf'}")  # and finegrain reads it again
    with torch.no_grad():
        assert close(back.encode_image(x), ours.encode_image(x))


def test_hf_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_method_spec(f"hf:{tmp_path}")
    run = make_run(tmp_path / "g", "grain_smoke")
    from finegrain.interop.export import export

    with pytest.raises(ValueError, match="not 'grain'; use --format towers"):
        export(str(run), "hf", tmp_path / "x")
