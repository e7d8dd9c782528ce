"""Text-conditioned retrieval scoring: the evaluation suite's chunked scorer vs the naive loop.

Scores N images x M texts with FLAIR's text-conditioned attention pooling head
(``finegrain.heads.pooling.TextConditionedPooling``; Xiao et al. CVPR 2025, Sec. 3.3):
    s(i, t) = cos( MHA(q = t, k = v = tokens_i), t ).

- ours: ``finegrain.eval.common.chunked_scores`` over a method whose ``score_features`` is
  ``TextConditionedPooling.similarity``: queries projected once per text, keys/values once per
  image, all (images x texts) pairs of a memory-budgeted chunk in one attention call;
- naive: one image at a time against all texts, the way ``nn.MultiheadAttention`` must be
  called when queries and keys need the same batch: the image's tokens are expanded to the M
  texts and the module projects keys and values once per *pair*;
- loop (reported for context): one image at a time through the head's ``similarity`` (keys
  and values once per image, queries once per image): the gain of batching images per call.

Prints one JSON object (``print_json``) with pairs/s, peak memory (CUDA: max allocated; CPU:
growth of the peak RSS, VmHWM, each variant in a fresh subprocess via ``run_in_subprocess``),
the ratios and the max abs difference (asserted <= 1e-4, fp32). Ratios (speed, higher is
better): ``chunked_speed_ratio`` = ours / naive pairs/s, ``chunked_vs_head_loop_speed_ratio``
= ours / loop pairs/s (peak memories are reported, not compared: the sides score different
numbers of images). The naive loop may run on the first ``--naive-images`` images only (its rate is per pair, so the
ratio stays comparable).

    python benchmarks/bench_conditioned_retrieval.py --quick         # CPU: 50 x 250, naive on 5 images
    python benchmarks/bench_conditioned_retrieval.py                 # 100 x 500, D=256, 64 tokens, naive on 10
    python benchmarks/bench_conditioned_retrieval.py --gpu-defaults  # 1000 x 5000, D=512, 196 tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    machine_info,
    print_json,
    run_in_subprocess,
    time_interleaved,
    vm_hwm_mb,
)
from finegrain.eval.common import EvalContext, chunked_scores
from finegrain.heads.pooling import TextConditionedPooling
from finegrain.methods.base import Method, MethodConfig


class PoolingScorer(Method):
    """A method holding only the head: features are given, ``score_features`` pools."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(MethodConfig(name="bench_pooling"))
        self.pooling = TextConditionedPooling(dim, heads)

    def score_features(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        return self.pooling.similarity(text_feats, image_feats, max_elements=2**62)


def make_inputs(a: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    m = PoolingScorer(a.dim, a.heads).to(device).eval()
    tokens = torch.randn(a.images, a.tokens, a.dim, device=device)  # (Ni, N, D)
    texts = torch.randn(a.texts, a.dim, device=device)  # (Nt, D)
    return m, tokens, texts


@torch.no_grad()
def naive_scores(m: PoolingScorer, tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Per image: MHA(query = every text, key = value = this image's tokens, batch = texts)."""
    p = m.pooling
    q = p.ln_q(texts)[:, None]  # (Nt, 1, D)
    t = F.normalize(texts, dim=-1)
    rows = []
    for i in range(tokens.shape[0]):
        kv = tokens[i : i + 1].expand(texts.shape[0], -1, -1)  # (Nt, N, D)
        pooled = p.attn(q, p.ln_k(kv), p.ln_v(kv), need_weights=False)[0][:, 0]  # (Nt, D)
        rows.append((F.normalize(pooled, dim=-1) * t).sum(-1))
    return torch.stack(rows)  # (n, Nt)


@torch.no_grad()
def loop_scores(m: PoolingScorer, tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Per image through the head's own ``similarity`` (keys/values once per image, queries
    once per call, i.e. per image): no per-pair projections, but no batching of images."""
    return torch.cat([m.pooling.similarity(texts, tokens[i : i + 1]) for i in range(len(tokens))])


def _run(variant: str, a: argparse.Namespace) -> tuple[float, int, float, Any]:
    """One variant, timed in this (fresh) process: (seconds, pairs, peak MB, scores on CPU)."""
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    m, tokens, texts = make_inputs(a, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = vm_hwm_mb()
    if variant != "ours":
        tokens = tokens[: a.naive_images]
    ctx = EvalContext.create(m, device, progress=False)
    out: dict[str, torch.Tensor] = {}

    def score() -> None:
        if variant == "ours":
            out["s"] = chunked_scores(ctx, tokens, texts, a.budget_mb)
        elif variant == "loop":
            out["s"] = loop_scores(m, tokens, texts).cpu()
        else:
            out["s"] = naive_scores(m, tokens, texts).cpu()

    dt = time_interleaved({variant: score}, 1, int(a.warmup), device)[variant]["median_s"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = vm_hwm_mb() - base
    pairs = tokens.shape[0] * texts.shape[0]
    return dt, pairs, peak, out["s"][: a.naive_images].float().numpy()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--texts", type=int, default=500)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--naive-images", type=int, default=10, help="0 = all images")
    ap.add_argument("--budget-mb", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", action="store_true", help="time a second run after a warm-up")
    ap.add_argument("--quick", action="store_true", help="50 x 250, naive on 5 images (CPU)")
    ap.add_argument("--gpu-defaults", action="store_true",
                    help="1000 x 5000, D=512, 196 tokens (ViT-B/16), naive on 100 images")  # fmt: skip
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.texts, a.naive_images = 50, 250, 5
    if a.gpu_defaults:
        a.images, a.texts, a.dim, a.tokens, a.warmup = 1000, 5000, 512, 196, True
        a.naive_images = 100 if a.naive_images == 10 else a.naive_images
        a.budget_mb = max(a.budget_mb, 4096)
    a.naive_images = a.naive_images or a.images
    ours_t, ours_pairs, ours_mem, ours_s = run_in_subprocess(_run, "ours", a)
    naive_t, naive_pairs, naive_mem, naive_s = run_in_subprocess(_run, "naive", a)
    loop_t, loop_pairs, loop_mem, loop_s = run_in_subprocess(_run, "loop", a)
    diff = float(max(abs(ours_s - naive_s).max(), abs(loop_s - naive_s).max()))
    res = {
        "benchmark": "conditioned_retrieval", "images": a.images, "texts": a.texts,
        "dim": a.dim, "tokens": a.tokens, "heads": a.heads,
        "naive_images": a.naive_images, "budget_mb": a.budget_mb,
        "ours_pairs_per_s": ours_pairs / ours_t, "naive_pairs_per_s": naive_pairs / naive_t,
        "ours_seconds": ours_t, "naive_seconds": naive_t,
        "ours_peak_mb": ours_mem, "naive_peak_mb": naive_mem,
        "loop_pairs_per_s": loop_pairs / loop_t, "loop_peak_mb": loop_mem,
        "chunked_speed_ratio": (ours_pairs / ours_t) / (naive_pairs / naive_t),
        "chunked_vs_head_loop_speed_ratio": (ours_pairs / ours_t) / (loop_pairs / loop_t),
        "max_abs_diff": diff, "machine": machine_info(a.device),
    }  # fmt: skip
    assert diff <= 1e-4, f"ours and naive differ by {diff:.3g} > 1e-4"
    return res


if __name__ == "__main__":
    print_json(main())
