"""The text-truncation policy of retrieval and zero-shot tasks, made explicit and recorded.

``truncate="model"`` (default): texts are tokenised to ``context_length`` (0 = the text tower's
own, e.g. 77) and longer ones are cut (the EOT kept last), as every CLIP evaluation does.
``truncate="stretch"``: the text tower's learned position table is stretched for the duration
of the task, without training (``finegrain.encoders.text_transformer.stretch_positions``;
``stretch_mode`` longclip | linear, ``stretch_keep`` first rows kept), to ``context_length``
rows (0 = Long-CLIP's 4x: 77 -> 248); texts longer than that are still cut.

Either way ``art["protocol"]`` records ``context_length`` (the effective one), ``truncation``
(the policy in words; with ``stretch``: its mode, keep and original length) and
``truncated_texts``: how many of the texts had more
tokens (start and end tokens included) than the effective context (counted with the tower's
own tokenizer before cutting). Nothing is ever refused for being long.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn as nn

from finegrain.data.tokenizers import ClipTokenizer, HFTokenizer
from finegrain.encoders.text_transformer import longclip_length, stretch_positions
from finegrain.eval.common import EvalContext


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Untruncated token count of every text, special tokens included (CLIP: SOT + EOT)."""
    if isinstance(tokenizer, ClipTokenizer):
        enc = tokenizer.backend()
        return [len(enc.encode(t)) + 2 for t in texts]
    if isinstance(tokenizer, HFTokenizer):
        ids = tokenizer.backend()(
            list(texts), truncation=False, add_special_tokens=True, verbose=False
        )
        return [len(x) for x in ids["input_ids"]]
    # unknown tokenizer: a text that fills every position of its row counts as cut
    rows = tokenizer(list(texts))  # (N, L)
    pad = int(getattr(tokenizer, "pad_id", 0))
    return [rows.shape[1] + 1 if int(r[-1]) != pad else 0 for r in rows]


def _text_tower(method: nn.Module) -> nn.Module:
    tower = method.towers().get("text")
    if tower is None or not hasattr(tower, "context_length"):
        raise ValueError(
            f"method '{method.cfg.name}' has no text tower at .text with a context_length; "
            "truncate='stretch' cannot apply (use truncate='model')"
        )
    return tower


@contextmanager
def text_policy(ctx: EvalContext, cfg: Any, texts: list[str]) -> Iterator[tuple[int, dict]]:
    """Within the ``with``: the method's text tower follows the task's truncation policy.
    Yields (context_length to pass to ``encode_texts``, protocol fields)."""
    m = ctx.method
    policy = getattr(cfg, "truncate", "model")
    tower = _text_tower(m) if policy == "stretch" else m.towers().get("text")
    native = int(getattr(tower, "context_length", 0) or 0)
    if policy == "model":
        length = cfg.context_length or native
        info = {
            "context_length": length or None,
            "truncation": f"truncate to {length} tokens" if length else "the method's own",
        }
        tok = getattr(tower, "tokenizer", None)
        info["truncated_texts"] = _count(tok, texts, length) if tok and length else None
        yield cfg.context_length, info
        return
    keep, mode = int(cfg.stretch_keep), cfg.stretch_mode
    target = cfg.context_length or longclip_length(native, keep)
    if target <= native:
        raise ValueError(
            f"truncate='stretch' needs context_length > the tower's {native} positions, got "
            f"{target} (0 = Long-CLIP's {longclip_length(native, keep)})"
        )
    stretched = stretch_positions(tower, target, mode, keep)
    stretched.stretch_mode, stretched.stretch_keep = mode, keep
    info = {
        "context_length": target,
        "truncation": f"stretch {native} -> {target} positions, then truncate to {target} tokens",
        "stretch": {"mode": mode, "from": native, **({"keep": keep} if mode == "longclip" else {})},
        "truncated_texts": _count(stretched.tokenizer, texts, target),
    }
    # the method's text tower(s): the student's is ``stretched``, others (an EMA teacher's,
    # e.g. DetailCLIP evaluated through it) are stretched the same way
    restore = m.replace_text_towers(
        lambda t: stretched if t is tower else stretch_positions(t, target, mode, keep)
    )
    try:
        yield target, info
    finally:
        restore()


def _count(tokenizer: Any, texts: list[str], length: int) -> int:
    return sum(n > length for n in token_lengths(tokenizer, texts))
