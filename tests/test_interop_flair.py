"""A FLAIR-shaped checkpoint (keys as ExplainableML/flair's ``FLAIR`` model saves them) loads
into the ``flair`` method; outputs equal a naive reference written from FLAIR's forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("open_clip")

from finegrain.interop import load_method_spec  # noqa: E402

from helpers.interop import TEXTS, close, open_clip_reference  # noqa: E402


class FlairReference(nn.Module):
    """FLAIR's inference path (``src/flair/model.py``): the ViT without projection returns
    (CLS, patches) after ``ln_post``; ``image_post`` / ``text_post`` are plain ``x @ proj``;
    ``visual_proj`` is LN(q/k/v) + ``nn.MultiheadAttention(add_zero_attn=True)``, the text
    embedding as query over the projected patches; scores are cosines."""

    def __init__(self, oc: nn.Module, embed: int) -> None:
        super().__init__()
        self.oc = oc
        vw, tw = oc.visual.transformer.width, oc.transformer.width
        self.image_post = nn.Parameter(torch.randn(vw, embed) * vw**-0.5)
        self.text_post = nn.Parameter(torch.randn(tw, embed) * tw**-0.5)
        self.attn = nn.MultiheadAttention(embed, 8, batch_first=True, add_zero_attn=True)
        self.ln_q, self.ln_k, self.ln_v = (nn.LayerNorm(embed) for _ in range(3))
        for ln in (self.ln_q, self.ln_k, self.ln_v):  # non-trivial norms: mapping is checked
            nn.init.normal_(ln.weight, 1.0, 0.2)
            nn.init.normal_(ln.bias, 0.0, 0.2)

    def state_dict_as_flair(self) -> dict[str, torch.Tensor]:
        sd = {
            k: v
            for k, v in self.oc.state_dict().items()
            if k not in ("visual.proj", "text_projection")
        }
        sd.update({"image_post.proj": self.image_post.data, "text_post.proj": self.text_post.data,
                   "logit_bias": torch.tensor(-10.0)})  # fmt: skip
        sd.update({f"visual_proj.attn.{k}": v for k, v in self.attn.state_dict().items()})
        for n in ("q", "k", "v"):
            sd.update(
                {
                    f"visual_proj.ln_{n}.{k}": v
                    for k, v in getattr(self, f"ln_{n}").state_dict().items()
                }
            )
        return sd

    def image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.oc.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
        x = v.ln_post(v.transformer(v.ln_pre(x)))
        return x[:, 0] @ self.image_post, x[:, 1:] @ self.image_post  # (B, E), (B, N, E)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.oc
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_post  # (T, E)

    def score(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        _, local = self.image(x)
        t = self.text(ids)  # (T, E)
        q = t.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, T, E)
        pooled = self.attn(self.ln_q(q), self.ln_k(local), self.ln_v(local), need_weights=False)[0]
        return (F.normalize(pooled, dim=-1) * F.normalize(q, dim=-1)).sum(-1)  # (B, T)


def test_flair_checkpoint_matches_reference(tmp_path):
    oc, cfg_file = open_clip_reference(tmp_path)
    ref = FlairReference(oc, embed=16).eval()
    sd = ref.state_dict_as_flair()
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "flair.pt"
    )
    method, cfg = load_method_spec(f"flair:{cfg_file}={tmp_path / 'flair.pt'}")
    assert cfg.method.name == "flair"
    ids = method.tokenize(TEXTS)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        g, _ = ref.image(x)
        assert close(method.encode_image(x, normalize=False), g)
        assert close(method.encode_text(ids, normalize=False), ref.text(ids))
        assert close(method.score(x, ids), ref.score(x, ids))
    bad = dict(sd)
    bad["image_post.ln_post.weight"] = torch.ones(32)  # a post-projection with LN: not FLAIR's
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unexpected \\['image_post.ln_post.weight'\\]"):
        load_method_spec(f"flair:{cfg_file}={tmp_path / 'bad.pt'}")
