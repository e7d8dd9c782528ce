"""finegrain: fine-grained vision-language pretraining (CLIP, SigLIP, FLAIR, GRAIN, ...).

Importing the package is cheap: submodules are imported on demand, so `import finegrain`
pulls in no training-only dependency (torchvision, timm, open_clip, transformers, ...).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path_or_spec: str, device: str = "cpu", strict: bool = True) -> tuple[Any, Any]:
    """``model, preprocess = finegrain.load(run_dir | checkpoint | 'open_clip:M=F' | 'hf:DIR' |
    'flair:F')``; see ``finegrain.api``. Imported lazily so ``import finegrain`` stays cheap."""
    from finegrain.api import load as _load

    return _load(path_or_spec, device=device, strict=strict)
