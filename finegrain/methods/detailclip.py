"""DetailCLIP (Monsefi et al. 2024, "DetailCLIP: Detail-Oriented CLIP for Fine-Grained Tasks",
arXiv 2409.06809), following its released code (KishoreP1/DetailCLIP: ``DetailCLIP`` in
``models.py``, ``DetailCLIPLoss`` / ``iBOTLoss`` / ``reconstLoss`` in ``losses.py``, ``main.py``).

Per image-text pair, two views u, v (RRC scale 0.14-1, colour jitter, grayscale, blur,
solarize, no flip) and one caption t:

1. EMA teacher (image tower + iBOT head) on the full views -> CLS-to-patch attention (mean
   over layers and heads) and iBOT logits for CLS and every patch.
2. Attention-based token removal: 2x2 patch blocks ranked by the teacher attention, the top
   ``int(n_blocks * keep_ratio) + 1`` kept (25 of 49 at 224 px), the rest removed.
3. Student image tower on the kept tokens; CLS -> projection -> CLIP embedding.
4. Light MAE decoder (1 block, 16 heads, sin-cos positions, mask tokens at removed positions)
   -> pixel head (normalised-pixel MSE on removed patches) and the shared iBOT head (patch logits);
   the encoder CLS -> iBOT head (CLS logits).
5. Loss = w_clip * mean_v CLIP(view_v, t) + w_patch * iBOT patch (removed tokens, within a view)
   + w_cls * DINO CLS (across views) + w_rec * reconstruction (mean over views); all weights 1.
6. After each applied step: logit-scale clamp (<= 100), centres (momentum 0.9, all-reduced batch
   means), EMA teacher with cosine momentum 0.996 -> 1 (pure functions of the step).

Where the released code differs from the paper text (code is the default, the paper an option):
- keep count ``int(49 * r) + 1`` and ``--mask-ratio`` that is a keep ratio (``keep_count="floor"``:
  exactly ``int(n * r)`` blocks);
- the EMA also covers the text transformer blocks and both projections, which the losses never
  use (only the teacher zero-shot eval, ``eval_model="teacher"``); token embedding, positions and
  final LayerNorm are shared with the student (``teacher_text="all"`` EMAs the whole tower,
  ``"none"`` keeps no text teacher);
- the patch teacher temperature is 0.04 for the whole first epoch, then 0.07 (``np.linspace(0.04,
  0.07, 1)`` indexed by epoch); ``teacher_temp_warmup="linear"`` ramps per step instead;
- weight decay on every >= 2-D tensor except biases (SLIP's rule; the CLS token, (1, 1, D) in
  timm, is decayed; ``weight_decay_rule="shared"`` uses finegrain's no-decay list for
  embeddings / tokens);
- the CLS loss pairs the teacher of one view with the student of the other (DINO), the patch
  loss stays within a view (iBOT), as the released ``iBOTLoss`` with two global crops.

Views (an option, not in the released code): ``views="tokens"`` cuts each view's random resized
crop (same scale range) out of the frozen bottom's feature map of the un-augmented image
(``finegrain.data.crop_boxes``; the hybrid tower's ``boxes``, so a cached bottom serves every
view) and the pixel target out of the image by the same box, with no photometric
augmentation; ``finegrain demo`` uses it on its shared hybrid tower (bench.config.CACHED_VIEWS),
where pixel views re-ran the bottom on every crop (3.1 vs 1.5 CPU s per step of 64) and the
model did not learn in 200 steps. ``"pixels"`` (default) is the released pipeline.

Towers (``detailclip_vitb16``): the released image tower is timm's ViT-B/16 (no pre-block
LayerNorm, eps 1e-6, patch bias, timm's init: ``image.ln_pre=false image.norm_eps=1e-6
image.patch_bias=true image.init=timm``; CLIP's layout is the option) and the text tower OpenAI
CLIP's with QuickGELU (``text.activation=quick_gelu``). The linear probe reads the backbone's
768-d patch tokens (``probe_features="projected"``: the 512-d projected ones).

Remaining differences from the released code: bf16 instead of fp16 AMP
(``train.precision=fp16``); without an option: the warm-up starts at ``lr / warmup_steps``
(released 1e-6); the student's kept tokens
stay in raster order (released: ``argsort`` order; the blocks are permutation-equivariant, so
the outputs agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from finegrain.data.collate import ContrastiveCollate
from finegrain.data.config import DataConfig
from finegrain.data.crop_boxes import crop_resize, sample_crop_boxes
from finegrain.data.transforms import MultiViewTransform, ViewAugment, eval_transform
from finegrain.encoders.base import build_image_tower, build_text_tower
from finegrain.heads.ema import ema_update_, make_teacher
from finegrain.heads.ibot import IBOTHead
from finegrain.heads.pixel_decoder import MAEDecoder, PixelHead
from finegrain.heads.projection import Projection
from finegrain.heads.token_removal import (
    attention_keep,
    check_block_grid,
    num_kept_blocks,
    random_keep,
    removed_from_keep,
)
from finegrain.losses.distillation import (
    batch_center,
    ema_center,
    ema_momentum,
    teacher_temperature,
)
from finegrain.losses.reconstruction import norm_pix_target, patchify
from finegrain.methods.base import Method, MethodConfig
from finegrain.methods.objectives import (
    ClipObjective,
    DistillationObjective,
    Objectives,
    ReconstructionObjective,
)
from finegrain.methods.vocab import l2
from finegrain.outputs import MethodOutput
from finegrain.registry import METHODS

TEXT_BLOCK_KEYS = ("transformer.", "blocks.", "encoder.layer.", "layers.")


@dataclass
class DetailCLIPConfig(MethodConfig):
    name: str = "detailclip"
    projection: Literal["linear", "none"] = "linear"
    local_loss: bool = True
    gather: bool = True
    # two views (released train_transform, applied twice)
    num_views: int = 2
    # "pixels": views cropped and augmented in the data pipeline, each run through the whole
    # image tower (released); "tokens": the method cuts each view's random resized crop out of
    # the image's frozen-bottom feature map (hybrid tower: cached, so the bottom runs once per
    # image; other towers: the crop of the pixels) and the pixel target out of the image, no
    # photometric augmentation (a cached feature map cannot be colour-jittered)
    views: Literal["pixels", "tokens"] = "pixels"
    crop_scale: tuple[float, float] = (0.14, 1.0)
    hflip: bool = False
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.1
    solarize_prob: float = 0.2
    # token removal
    removal: Literal["attention", "random"] = "attention"
    keep_ratio: float = 0.5  # released --mask-ratio (a keep ratio)
    keep_count: Literal["released", "floor"] = "released"
    # decoder and heads
    decoder_depth: int = 1
    decoder_heads: int = 16
    ibot_out_dim: int = 8192
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    norm_pix_loss: bool = True
    # self-distillation
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # CLS
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_patch_temp: float = 0.04
    teacher_temp_warmup_steps: int = 0  # released: one epoch of steps
    teacher_temp_warmup_epochs: int = 1
    teacher_temp_warmup: Literal["epochwise", "linear"] = "epochwise"
    center_momentum: float = 0.9
    ema_momentum: float = 0.996
    ema_final_momentum: float = 1.0
    teacher_text: Literal["blocks", "all", "none"] = "blocks"
    freeze_patch_embed: bool = False  # released: frozen random patch embedding (MoCo v3)
    weight_decay_rule: Literal["released", "shared"] = "released"
    eval_model: Literal["student", "teacher"] = "student"
    # linear probe features: backbone (the tower's final patch tokens, width D, as iBOT /
    # DetailCLIP's dense protocols read the ViT) | projected (through image_proj, width E)
    probe_features: Literal["backbone", "projected"] = "backbone"
    # loss weights
    clip_weight: float = 1.0
    ibot_patch_weight: float = 1.0
    ibot_cls_weight: float = 1.0
    recon_weight: float = 1.0


def _square_patch(tower: nn.Module, name: str) -> int:
    p = getattr(tower, "patch_size", None)
    if p is None or not hasattr(tower, "num_patches"):
        raise ValueError(f"detailclip needs a ViT image tower with patch tokens (vit, timm or "
                         f"open_clip ViT); '{name}' has none")  # fmt: skip
    ph, pw = (p, p) if isinstance(p, int) else tuple(p)
    if ph != pw:
        raise ValueError(f"detailclip needs square patches, got {ph}x{pw}")
    return int(ph)


def _freeze_patch_embed(tower: nn.Module) -> None:
    params = [p for n, p in tower.named_parameters() if n.startswith(("conv1.", "patch_embed."))
              or ".conv1." in n or ".patch_embed." in n]  # fmt: skip
    if not params:
        raise ValueError(
            "freeze_patch_embed: no patch embedding (conv1 / patch_embed) in the tower"
        )
    for p in params:
        p.requires_grad_(False)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, R) -> (B, R, D)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


@METHODS.register("detailclip")
class DetailCLIP(Method):
    """CLIP + EMA-teacher iBOT self-distillation + MAE pixel reconstruction + attentive removal."""

    Config = DetailCLIPConfig

    def __init__(self, cfg: DetailCLIPConfig) -> None:
        super().__init__(cfg)
        if cfg.num_views < 2:
            raise ValueError(
                f"detailclip needs num_views >= 2 (DINO CLS loss), got {cfg.num_views}"
            )
        self.image = build_image_tower(cfg.image)
        self.text = build_text_tower(cfg.text)
        self.patch = _square_patch(self.image, cfg.image.name)
        grid = self.image.num_patches((cfg.image.image_size, cfg.image.image_size))
        check_block_grid(grid)
        num_kept_blocks((grid[0] // 2) * (grid[1] // 2), cfg.keep_ratio, cfg.keep_count)
        if getattr(cfg.image, "patch_dropout", 0.0) > 0:
            raise ValueError("detailclip removes tokens itself; set image.patch_dropout=0")
        if cfg.freeze_patch_embed:
            _freeze_patch_embed(self.image)
        width = self.image.width
        self.image_proj = Projection(width, cfg.embed_dim, cfg.projection, where="image tower")
        self.text_proj = Projection(self.text.width, cfg.embed_dim, cfg.projection,
                                    where="text tower")  # fmt: skip
        self.make_temperature()
        self.decoder = MAEDecoder(width, cfg.decoder_depth, cfg.decoder_heads)
        self.pixel_head = PixelHead(width, self.patch)
        self.ibot_head = IBOTHead(width, cfg.ibot_out_dim, cfg.ibot_hidden_dim,
                                  cfg.ibot_bottleneck_dim)  # fmt: skip
        student = {"image": self.image, "image_proj": self.image_proj, "ibot_head": self.ibot_head,
                   "text_proj": self.text_proj}  # fmt: skip
        if cfg.teacher_text != "none":
            student["text"] = self.text
        self.teacher = nn.ModuleDict({k: make_teacher(m) for k, m in student.items()})
        k = cfg.ibot_out_dim
        self.register_buffer("center_cls", torch.zeros(k))
        self.register_buffer("center_patch", torch.zeros(k))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # applied steps so far
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.objectives = detailclip_objectives(cfg)

    # ---- method hooks -----------------------------------------------------------------
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def make_transform(self, data_cfg: DataConfig, train: bool = True) -> Any:
        if not train or self.cfg.views == "tokens":  # tokens: views cut in ``features``
            return super().make_transform(data_cfg, train)
        c = self.cfg
        view = ViewAugment(size=data_cfg.image_size, crop_scale=tuple(c.crop_scale), hflip=c.hflip,
                           jitter_prob=c.jitter_prob, grayscale_prob=c.grayscale_prob,
                           blur_prob=c.blur_prob, solarize_prob=c.solarize_prob)  # fmt: skip
        return MultiViewTransform(eval_transform(data_cfg), [view] * c.num_views)

    def make_collate(self, train: bool = True) -> ContrastiveCollate:
        return ContrastiveCollate(self.text.tokenizer, 1, train=train)

    def no_decay(self, name: str, p: torch.Tensor, rule: str) -> bool:
        """Released (SLIP lineage, ``main.get_optim``): every >= 2-D tensor is decayed except
        biases, so timm's (1, 1, D) CLS token is decayed too; the native tower keeps it as a
        (D,) vector, decayed here by name (``weight_decay_rule="shared"``: the base rule, i.e.
        ``train.no_decay``)."""
        if self.cfg.weight_decay_rule == "shared" or rule != "released":
            return super().no_decay(name, p, rule)
        if name.endswith("class_embedding"):
            return False
        return p.ndim < 2 or "bias" in name

    # ---- encoders -----------------------------------------------------------------------
    def eval_towers(self) -> dict[str, nn.Module]:
        """The student's towers and projections, the teacher's with ``eval_model="teacher"``."""
        return {name: self._model(name) for name in self.towers()}

    def replace_text_towers(self, make: Callable[[nn.Module], nn.Module]) -> Callable[[], None]:
        """The student's text tower and the teacher's (when it keeps one)."""
        restore_student = super().replace_text_towers(make)
        if "text" not in self.teacher:
            return restore_student
        old = self.teacher["text"]
        self.teacher["text"] = make(old)

        def restore() -> None:
            restore_student()
            self.teacher["text"] = old

        return restore

    def _model(self, part: str) -> nn.Module:
        if self.cfg.eval_model == "teacher" and part in self.teacher:
            return self.teacher[part]
        return getattr(self, part)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self._model("image_proj")(self._model("image")(images).pooled)  # (B, E)
        return l2(x) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        lead = tokens.shape[:-1]
        x = self._model("text")(tokens.reshape(-1, tokens.shape[-1])).pooled
        x = self._model("text_proj")(x).reshape(*lead, -1)  # (..., E)
        return l2(x) if normalize else x

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w): final patch tokens through the image projection (the features the
        iBOT patch loss and the decoder shape; zero-shot and linear-probe segmentation)."""
        out = self._model("image")(images)
        return out.token_map(self._model("image_proj")(out.tokens))  # (B, E, h, w)

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features of the linear probe: the backbone's final patch tokens
        (``probe_features="backbone"``, C = tower width, the tokens iBOT's linear protocol reads)
        or ``dense_features`` (``"projected"``, C = embed dim)."""
        if self.cfg.probe_features == "projected":
            return self.dense_features(images)
        return self._model("image")(images).token_map()

    # ---- training -----------------------------------------------------------------------
    @torch.no_grad()
    def _teacher(self, views: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Full views (BV, 3, H, W) -> (keep (BV, M), teacher iBOT logits (BV, 1 + N, K), grid)."""
        t = self.teacher
        out = t["image"](views, return_attention=self.cfg.removal == "attention", **kw)
        logits = t["ibot_head"](torch.cat([out.pooled[:, None], out.tokens], dim=1))
        c = self.cfg
        if c.removal == "attention":
            attn = out.attention.float().mean(dim=(1, 2))  # (BV, N): layers and heads
            keep = attention_keep(attn, out.grid_hw, c.keep_ratio, c.keep_count)
        else:
            keep = random_keep(views.shape[0], out.grid_hw, c.keep_ratio, device=views.device,
                               count=c.keep_count)  # fmt: skip
        return keep, logits, out.grid_hw

    def _views(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(tower input (BV, 3, H, W), pixels of the views (BV, 3, H, W), tower kwargs), V."""
        v = self.cfg.num_views
        if self.cfg.views == "tokens" and self.training and "image" in batch:
            images = batch["image"].repeat_interleave(v, 0)  # (BV, 3, H, W), sample-major
            boxes = sample_crop_boxes(images.shape[0], tuple(self.cfg.crop_scale))
            pixels = crop_resize(images, boxes, tuple(images.shape[-2:]))
            if getattr(self.image, "crops_bottom", False):  # crop the cached feature map
                return images, pixels, {"boxes": boxes}
            return pixels, pixels, {}
        views = batch.get("views")
        if views is None and not self.training and "image" in batch:
            views = batch["image"][:, None].expand(-1, v, -1, -1, -1)
        if views is None:
            raise ValueError("detailclip needs batch['views'] (B, V, 3, H, W) from its "
                             f"make_transform and batch['text']; got keys {sorted(batch)}")  # fmt: skip
        flat = views.flatten(0, 1)  # (BV, 3, H, W), sample-major
        return flat, flat, {}

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training batches carry ``views`` (B, V, 3, H, W) from ``make_transform`` (or, with
        ``views="tokens"``, ``image``: the views are cut here); in eval mode (validation loss) a
        batch without views uses its ``image`` as every view."""
        if "text" not in batch:
            raise ValueError("detailclip needs batch['views'] (B, V, 3, H, W) from its "
                             f"make_transform and batch['text']; got keys {sorted(batch)}")  # fmt: skip
        flat, pixels, kw = self._views(batch)
        v = self.cfg.num_views
        b = flat.shape[0] // v
        keep, t_logits, grid = self._teacher(flat, **kw)
        n = grid[0] * grid[1]
        removed = removed_from_keep(keep, n)  # (BV, R)
        out = self.image(flat, keep=keep, **kw)  # tokens (BV, M, D)
        enc = torch.cat([out.pooled[:, None], out.tokens], dim=1)  # (BV, 1 + M, D)
        dec = _gather(self.decoder(enc, keep, grid)[:, 1:], removed)  # (BV, R, D)
        target = _gather(patchify(pixels, self.patch), removed)  # (BV, R, p*p*3)
        if self.cfg.norm_pix_loss:
            target = norm_pix_target(target)
        feats = {
            "image": l2(self.image_proj(out.pooled)),  # (BV, E)
            "s_cls": self.ibot_head(out.pooled),  # (BV, K)
            "s_patch": self.ibot_head(dec),  # (BV, R, K)
            "t_cls": t_logits[:, 0],  # (BV, K)
            "t_patch": _gather(t_logits[:, 1:], removed),  # (BV, R, K)
            "t_patch_mean": t_logits[:, 1:].mean(1),  # (BV, K): for the patch centre
            "pixels": self.pixel_head(dec),  # (BV, R, p*p*3)
            "pixel_target": target,
        }
        feats = {k: x.reshape(b, v, *x.shape[1:]) for k, x in feats.items()}  # (B, V, ...)
        feats["text"] = self.encode_text(batch["text"])  # (B, E)
        return feats

    def temperatures(self, step: int | None = None) -> tuple[float, float]:
        """(teacher CLS temperature, teacher patch temperature) at ``step`` (default: now)."""
        c = self.cfg
        s = int(self.step) if step is None else step
        args = (c.teacher_temp_warmup_steps,)
        kw = {"warmup_epochs": c.teacher_temp_warmup_epochs, "mode": c.teacher_temp_warmup}
        return (teacher_temperature(s, *args, c.warmup_teacher_temp, c.teacher_temp, **kw),
                teacher_temperature(s, *args, c.warmup_teacher_patch_temp, c.teacher_patch_temp,
                                    **kw))  # fmt: skip

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> MethodOutput:
        """``detailclip_objectives``; in training also the batch centres for the next step."""
        out = super().loss_from_features(feats)
        if self.training:  # applied in after_optimizer_step, once per applied step
            self._pending = (batch_center(feats["t_cls"]), batch_center(feats["t_patch_mean"]))
        return out

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Clamp, centres, EMA teacher. ``step`` applied updates so far: the next iteration is
        the released iteration ``it = step``, whose teacher is m[it] t + (1 - m[it]) theta_it."""
        c = self.cfg
        super().after_optimizer_step(step, total_steps)  # the logit-scale clamp
        if self._pending is not None:
            self.center_cls.copy_(ema_center(self.center_cls, self._pending[0], c.center_momentum))
            self.center_patch.copy_(ema_center(self.center_patch, self._pending[1],
                                               c.center_momentum))  # fmt: skip
            self._pending = None
        m = ema_momentum(step, total_steps, c.ema_momentum, c.ema_final_momentum)
        for name, teacher in self.teacher.items():
            shared = _text_shared if (name == "text" and c.teacher_text == "blocks") else _none
            ema_update_(teacher, getattr(self, name), m, shared=shared)
        self.step.fill_(step)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        own = self.state_dict()
        for key, value in state_dict.items():
            if not key.startswith(prefix + "teacher."):
                continue
            name = key[len(prefix) :]
            if name in own and tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(
                    f"detailclip: teacher tensor '{name}' is {tuple(value.shape)} in the checkpoint "
                    f"but {tuple(own[name].shape)} here; teacher and student architectures must match"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _text_shared(name: str) -> bool:
    """Released: only the text transformer blocks are EMA'd; embeddings / final norm shared."""
    return not any(k in name for k in TEXT_BLOCK_KEYS)


def _none(name: str) -> bool:
    return False


def detailclip_objectives(cfg: DetailCLIPConfig) -> Objectives:
    """w_clip * CLIP (mean over views) + w_patch * iBOT patch + w_cls * DINO CLS + w_rec * recon."""
    return Objectives([
        (ClipObjective(cfg.local_loss, cfg.gather), {"clip_loss": cfg.clip_weight}),
        (DistillationObjective(cfg.student_temp),
         {"ibot_patch_loss": cfg.ibot_patch_weight, "ibot_cls_loss": cfg.ibot_cls_weight}),
        (ReconstructionObjective(), {"recon_loss": cfg.recon_weight}),
    ])  # fmt: skip
