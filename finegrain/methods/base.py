"""The method contract: every training objective is a ``Method`` registered by name.

The trainer only ever calls:
- ``make_transform(data_cfg, train)`` (the per-sample image transform the loader applies; may
  make extra ``views``) and ``make_collate(train)`` (schema samples -> batch);
- ``forward(batch) -> MethodOutput`` (== ``loss_from_features(features(batch))``);
- ``features(batch) -> dict[str, Tensor]`` and ``loss_from_features(feats)``, which split the
  forward so the trainer can do *exact* gradient accumulation for contrastive losses: every
  tensor in ``feats`` has the batch as its leading dim (pad ragged things), so micro-batch
  features can be concatenated along dim 0. Under accumulation ``features`` runs twice per
  micro-batch (cache, then recompute) and ``loss_from_features`` once per step, also on a step
  that is then skipped for a non-finite loss: state updates belong in ``after_optimizer_step``;
- ``param_groups(weight_decay, no_decay)`` (trainable parameters only; ``frozen_modules`` never
  appear; which are not decayed is ``no_decay(name, p, rule)``, ``train.no_decay``);
- ``after_optimizer_step(step, total_steps)`` after every *applied* update (not after a step
  skipped for a non-finite loss): EMA teachers, centre updates, clamping; schedules there are
  pure functions of ``step`` so resume is exact;
- ``frozen_modules() -> {name: module}``: teachers/auxiliary modules with no gradient, never in
  the optimizer, kept in eval mode by ``train()``, not FSDP-sharded (``fsdp_units()`` lists
  what is), but in ``state_dict`` (and so in checkpoints) with their buffers;
- ``fsdp_units()``: the modules ``train.distributed=fsdp`` wraps with ``fully_shard``.
Counts that are not features (matched boxes, skipped samples) go in ``MethodOutput.stats``
(loss side) or the collate's ``batch["stats"]`` (data side); both reach TensorBoard as
``stats/<name>`` and summary.json's ``"stats"``.
Evaluation, the benchmark, interop and the API call ``encode_image``, ``encode_text``,
``tokenize``, ``towers()`` / ``eval_towers()`` (the modules they read), and the optional hooks
``OPTIONAL_HOOKS`` (``score_features``, ``dense_features``, ``region_embeddings``,
``predict_boxes``, ``attention_maps``) where ``capabilities()``, the one place that computes
them, lists them; all are declared here, and nothing outside ``methods/`` probes a method's
attributes (``tests/test_method_capabilities.py``).

Names (towers ``image``/``text``, features, loss terms), the L2 helper and checkpoint key
migrations are the vocabulary of ``finegrain.methods.vocab``; ``migrate_state_dict`` maps the
keys of checkpoints written before a rename (``key_renames``) and runs on every load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from finegrain.config import Checked
from finegrain.data.config import DataConfig
from finegrain.data.transforms import SampleTransform, eval_transform, train_transform
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.heads.logit_scale import LogitScale
from finegrain.losses.distributed import world_info
from finegrain.methods.objectives import Objectives
from finegrain.methods.vocab import TOWERS, rename_prefixes
from finegrain.outputs import MethodOutput
from finegrain.registry import METHODS


@dataclass
class MethodConfig(Checked):
    """Fields every method has; methods subclass this with their own fields."""

    __registry__ = METHODS

    name: str = "clip"
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128
    init_logit_scale: float = 1 / 0.07  # t at init (the parameter is s = ln t)
    max_logit_scale: float = 100.0  # clamp t <= this after each step (0 = no clamp)


# the optional hooks a method may implement; ``Method.capabilities()`` names those it does
OPTIONAL_HOOKS = (
    "score_features",  # text-conditioned scoring (FLAIR)
    "dense_features",  # (B, D, h, w) segmentation features
    "region_embeddings",  # region queries (GRAIN)
    "predict_boxes",
    "attention_maps",
)
CAPABILITIES = (*OPTIONAL_HOOKS, "feature_cache")

NO_DECAY_RULES = ("released", "extended")

# The released rule (OpenCLIP main.py ``exclude``, also used by FLAIR's main.py and GRAIN's
# backbone): no decay for 0-/1-d parameters and for names containing "bn", "ln", "bias" or
# "logit_scale"; token/position embeddings, class tokens and learned queries (>= 2-d) DO decay.
RELEASED_NO_DECAY_KEYS = ("bn", "ln", "bias", "logit_scale")
# The "extended" rule (finegrain's earlier default, not used by any of the released codebases):
# additionally spares embeddings, position tables, class tokens and learned queries.
EXTENDED_NO_DECAY_KEYS = (
    "bias",
    "norm",
    "ln_",
    "logit_scale",
    "logit_bias",
    "embed",
    "cls_token",
    "pos",
    "query",
    "queries",
    "gamma",
    "scale",
)


def check_no_decay_rule(rule: str) -> None:
    if rule not in NO_DECAY_RULES:
        raise ValueError(
            f"unknown train.no_decay '{rule}'; valid choices: {', '.join(NO_DECAY_RULES)}"
        )


def default_no_decay(name: str, p: torch.Tensor, rule: str) -> bool:
    """Whether parameter ``name`` is excluded from weight decay under ``rule``."""
    keys = RELEASED_NO_DECAY_KEYS if rule == "released" else EXTENDED_NO_DECAY_KEYS
    return p.ndim < 2 or any(k in name for k in keys)


class Method(nn.Module):
    """Base class. Subclasses set ``Config`` and implement ``features`` and
    ``loss_from_features``; everything else has a sensible default."""

    Config: type[MethodConfig] = MethodConfig
    # (old prefix, new prefix) of state-dict keys renamed since checkpoints were written
    key_renames: tuple[tuple[str, str], ...] = ()
    temperature: LogitScale | None = None  # the one logit scale (and bias), ``make_temperature``
    objectives: Objectives | None = None  # the weighted objectives ``loss_from_features`` sums

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_load_state_dict_pre_hook(_migrate_keys)

    def make_temperature(
        self, bias_init: float | None = None, bias_prior: bool = False
    ) -> LogitScale:
        """``self.temperature``: t initialised to ``cfg.init_logit_scale``, clamped to
        ``cfg.max_logit_scale`` after every applied step; parameters ``logit_scale`` (s = ln t)
        and, with ``bias_init``, ``logit_bias`` on the method itself. ``bias_prior``: the first
        training forward sets b to the joined batch's prior (``prior_logit_bias``), once."""
        c = self.cfg
        self.temperature = LogitScale(
            c.init_logit_scale, c.max_logit_scale, bias_init=bias_init, bias_prior=bias_prior
        )
        return self.temperature.install(self)

    def migrate_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """Keys (and layouts) of checkpoints written by earlier versions -> today's: the
        ``key_renames`` prefixes moved. Loaders call it before checking keys; ``load_state_dict``
        applies it too (a pre-hook). Methods with layout changes override and call super."""
        return rename_prefixes(state, self.key_renames)

    # ---- training -------------------------------------------------------------------
    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> MethodOutput:
        """The weighted sum of ``self.objectives`` (``finegrain.methods.objectives``)."""
        if self.objectives is None:
            raise NotImplementedError(f"method '{self.cfg.name}' sets no objectives")
        if self.temperature is not None and "image" in feats:  # b's prior: the joined batch
            self.temperature.init_bias_from_batch(feats["image"].shape[0] * world_info()[1])
        return self.objectives(self, feats)

    def forward(self, batch: dict[str, Any]) -> MethodOutput:
        return self.loss_from_features(self.features(batch))

    def no_decay(self, name: str, p: torch.Tensor, rule: str) -> bool:
        """Whether parameter ``name`` gets no weight decay under ``train.no_decay`` ``rule``
        ("released": the method's released code, by default OpenCLIP's rule; "extended":
        also embeddings and learned queries). Methods whose released code differs override."""
        return default_no_decay(name, p, rule)

    def param_groups(self, weight_decay: float, no_decay: str = "released") -> list[dict[str, Any]]:
        """Two AdamW groups over the trainable parameters: decayed and not (``no_decay``)."""
        check_no_decay_rule(no_decay)
        decay, keep = [], []
        frozen = self.frozen_parameter_ids()
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in frozen:
                continue
            (keep if self.no_decay(name, p, no_decay) else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0},
        ]

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook for EMA teachers, centre updates, clamping. Called after every *applied*
        optimizer step (``step`` is 1-based, ``total_steps`` is ``train.steps``); never after
        a step skipped for a non-finite loss. Default: clamp the logit scale."""
        if self.temperature is not None:
            self.temperature.clamp_()

    # ---- teachers and auxiliary modules ---------------------------------------------
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Submodules trained without gradients (an EMA teacher): ``requires_grad`` False, not
        in the optimizer, eval mode while the method trains, not FSDP-sharded, but in the
        ``state_dict`` with their buffers. They must be attributes of the method itself (not
        inside a tower), so no FSDP unit contains them."""
        return {}

    def frozen_parameter_ids(self) -> set[int]:
        """``id`` of every parameter of ``frozen_modules()``; also turns their grads off."""
        ids = set()
        for module in self.frozen_modules().values():
            for p in module.parameters():
                p.requires_grad_(False)
                ids.add(id(p))
        return ids

    def train(self, mode: bool = True) -> Method:
        """``nn.Module.train``, except that ``frozen_modules`` stay in eval mode (and frozen)."""
        super().train(mode)
        self.frozen_parameter_ids()
        for module in self.frozen_modules().values():
            module.eval()
        return self

    def fsdp_units(self) -> list[nn.Module]:
        """Modules to ``fully_shard`` under FSDP, innermost first: every transformer block
        (``blocks`` / ``resblocks`` lists), then each direct child; frozen modules excluded."""
        frozen = {id(m) for f in self.frozen_modules().values() for m in f.modules()}
        units: list[nn.Module] = []
        for module in self.modules():
            if id(module) in frozen:
                continue
            blocks = getattr(module, "blocks", None) or getattr(module, "resblocks", None)
            if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                units += list(blocks)
        units += [c for c in self.children() if id(c) not in frozen]
        for unit in units:
            if any(id(m) in frozen for m in unit.modules()):
                raise ValueError(f"method '{self.cfg.name}': a frozen module sits inside the "
                                 f"FSDP unit {type(unit).__name__}; make it a direct attribute "
                                 "of the method")  # fmt: skip
        return units

    # ---- data -----------------------------------------------------------------------
    def make_transform(self, data_cfg: DataConfig, train: bool = True) -> SampleTransform:
        """The per-sample transform the loader applies (``SampleTransform.for_sample``):
        default the box-aware ``train_transform`` / ``eval_transform`` of ``data_cfg``. A
        method needing extra views returns e.g. ``multi_view_transform(data_cfg, [...])``;
        samples then carry ``views`` and ``view_regions`` (``stack_views`` in its collate)."""
        return train_transform(data_cfg) if train else eval_transform(data_cfg)

    def make_collate(self, train: bool = True) -> Callable[[list[dict]], dict[str, Any]]:
        """A picklable collate turning schema samples into this method's batch."""
        raise NotImplementedError

    # ---- inference ------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(N, L) token ids from the text tower's tokenizer."""
        return self.text.tokenizer(texts)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def image_features_for_scoring(self, images: torch.Tensor) -> Any:
        """Whatever ``score_features`` needs from images (default: global embeddings)."""
        return self.encode_image(images)

    def text_features_for_scoring(self, tokens: torch.Tensor) -> Any:
        return self.encode_text(tokens)

    def score_features(self, image_feats: Any, text_feats: Any) -> torch.Tensor:
        """(Ni, Nt) similarity; text-conditioned methods override this."""
        return image_feats @ text_feats.t()

    @property
    def has_conditioned_score(self) -> bool:
        return "score_features" in self.capabilities()

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(Ni, Nt) similarity of every image with every text."""
        return self.score_features(
            self.image_features_for_scoring(images), self.text_features_for_scoring(tokens)
        )

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) per-patch features in the text embedding space (segmentation)."""
        raise NotImplementedError(f"method '{self.cfg.name}' has no dense_features")

    def region_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) normalized region embeddings, for methods with region queries."""
        raise NotImplementedError(f"method '{self.cfg.name}' has no region embeddings")

    @property
    def has_regions(self) -> bool:
        return "region_embeddings" in self.capabilities()

    def predict_boxes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, Q, 4) boxes as normalised xyxy, one per region query (GRAIN)."""
        raise NotImplementedError(f"method '{self.cfg.name}' has no predict_boxes")

    def attention_maps(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(Ni, Nt, h, w) where the method's own text-conditioned pooling looks (figures)."""
        raise NotImplementedError(f"method '{self.cfg.name}' has no attention_maps")

    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features the linear probe reads (default: ``dense_features``)."""
        return self.dense_features(images)

    # ---- the declared contract: what evaluation, the benchmark, interop and the API use ----
    supports_feature_cache: bool = False  # features() reads image_prefix / text_prefix
    in_default_benchmark: bool = True  # False: ``finegrain demo`` runs it only via --methods
    num_captions: int = 1  # K > 1: the collate gives ``texts`` (B, K, L) (the feature cache)
    # zero-shot class vector from prompt embeddings: "renormalized" (OpenCLIP) or "mean"
    # (GRAIN's released eval: the mean of normalised prompt embeddings, not renormalised)
    zeroshot_class_vectors: str = "renormalized"

    def capabilities(self) -> frozenset[str]:
        """What this method can do beyond encoding, the ONE place it is computed: the names of
        the optional hooks it implements (``CAPABILITIES``), and ``feature_cache``."""
        own = {n for n in OPTIONAL_HOOKS if getattr(type(self), n) is not getattr(Method, n)}
        return frozenset(own | ({"feature_cache"} if self.supports_feature_cache else set()))

    def towers(self) -> dict[str, nn.Module]:
        """The trained towers ``image`` / ``text`` and, where the method has them, the
        projections ``image_proj`` / ``text_proj`` (interop and export read these)."""
        parts = {}
        for name in (*TOWERS, "image_proj", "text_proj"):
            module = getattr(self, name, None)
            if isinstance(module, nn.Module):
                parts[name] = module
        return parts

    def eval_towers(self) -> dict[str, nn.Module]:
        """``towers()`` as evaluation runs them (a method evaluated through an EMA teacher
        returns the teacher's); dense variants and long-text stretching act on these."""
        return self.towers()

    def replace_text_towers(self, make: Callable[[nn.Module], nn.Module]) -> Callable[[], None]:
        """Put ``make(tower)`` in place of every text tower evaluation may run (long-text
        position stretching); returns the function that puts the originals back."""
        old = self.text
        self.text = make(old)

        def restore() -> None:
            self.text = old

        return restore


def build_method(cfg: MethodConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)


def _migrate_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: ``migrate_state_dict`` on this method's keys, in place."""
    if not isinstance(module, Method):
        return
    own = {k[len(prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
    state_dict.update({prefix + k: v for k, v in module.migrate_state_dict(own).items()})
