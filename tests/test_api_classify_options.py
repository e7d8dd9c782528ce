"""``FinegrainModel.classify`` takes the zero-shot evaluation's options (issue 15):
descriptor_prompts, class_vectors, region_score and fusion_alpha, each checked against a
loop over prompts, descriptors and region queries written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import finegrain
from finegrain.config import ConfigError

from helpers.interop import make_run

NAMES = ["circle", "star"]
DESC = {"circle": ["round", "a smooth edge"], "star": ["five points"]}


@pytest.fixture(scope="module")
def grain(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("grain") / "run", "grain_smoke")
    model, _ = finegrain.load(str(run))
    torch.manual_seed(0)
    return model, torch.randn(3, 3, 64, 64)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def naive_probs(model, x, prompts, renorm: bool, alpha: float, region: str) -> torch.Tensor:
    """Loop version: class vector, global cosine, region score, fusion, softmax."""
    m = model.method
    with torch.no_grad():
        g = m.encode_image(x).float()  # (B, E)
        regions = m.region_embeddings(x).float()  # (B, Q, E)
        vecs = []
        for ps in prompts:
            embs = [_unit(m.encode_text(m.tokenize([p]))[0].float()) for p in ps]
            mean = sum(embs) / len(embs)
            vecs.append(_unit(mean) if renorm else mean)
        raw = {
            c: [_unit(m.encode_text(m.tokenize([d]))[0].float()) for d in DESC[c]] for c in NAMES
        }
    out = torch.zeros(x.shape[0], len(NAMES))
    for b in range(x.shape[0]):
        for c, name in enumerate(NAMES):
            s = float(_unit(g[b]) @ vecs[c])
            qs = [_unit(r) for r in regions[b]]
            if region == "released":
                reg = sum(max(float(q @ e) for e in raw[name]) for q in qs) / len(qs)
            else:
                reg = max(float(q @ vecs[c]) for q in qs)
            out[b, c] = alpha * s + (1 - alpha) * reg if alpha < 1 else s
    return (model.logit_scale * out).softmax(-1)


def test_classify_passes_zeroshot_options(grain) -> None:
    model, x = grain
    released = [[f"{c} which has round", f"{c} which is a smooth edge"] for c in ["circle"]]
    released += [["star which has five points"]]
    mv = [["circle, which has round", "circle, which is a smooth edge"]]
    mv += [["star, which has five points"]]
    cases = [
        # (kwargs, prompts, renormalised class vectors, alpha, region score)
        ({}, released, False, 1.0, "released"),  # descriptions: mean, not renormalised
        ({"class_vectors": "renormalized"}, released, True, 1.0, "released"),
        ({"descriptor_prompts": "menon_vondrick"}, mv, False, 1.0, "released"),
        ({"fusion_alpha": 0.4}, released, False, 0.4, "released"),
        ({"fusion_alpha": 0.4, "region_score": "max_query"}, released, False, 0.4, "max_query"),
    ]
    for kw, prompts, renorm, alpha, region in cases:
        got = model.classify(x, NAMES, DESC, "plain", **kw)
        ref = naive_probs(model, x, prompts, renorm, alpha, region)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=f"options {kw}")
    # the options change the answer (so the comparison above would see them ignored)
    base = model.classify(x, NAMES, DESC, "plain")
    fused = model.classify(x, NAMES, DESC, "plain", fusion_alpha=0.0)
    assert not torch.allclose(base, fused, atol=1e-4)


def test_classify_bad_options(grain, tmp_path) -> None:
    model, x = grain
    with pytest.raises(ConfigError, match="region_score"):
        model.classify(x, NAMES, DESC, region_score="best")
    with pytest.raises(ValueError, match="fusion_alpha must lie in"):
        model.classify(x, NAMES, DESC, fusion_alpha=1.5)
    clip, _ = finegrain.load(str(make_run(tmp_path / "clip", "clip_smoke")))
    with pytest.raises(ValueError, match="needs a region head"):
        clip.classify(x, NAMES, fusion_alpha=0.5)
    # CLIP without descriptions keeps the renormalised class vector (OpenCLIP)
    probs = clip.classify(x, NAMES)
    with torch.no_grad():
        g = F.normalize(clip.method.encode_image(x).float(), dim=-1)
        w = F.normalize(clip.method.encode_text(clip.method.tokenize(NAMES)).float(), dim=-1)
    torch.testing.assert_close(
        probs, (clip.logit_scale * g @ w.t()).softmax(-1), rtol=1e-4, atol=1e-5
    )
