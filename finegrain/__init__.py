"""finegrain: fine-grained vision-language pretraining (CLIP, SigLIP, FLAIR, GRAIN, ...).

Importing the package is cheap: submodules are imported on demand, so `import finegrain`
pulls in no training-only dependency (torchvision, timm, open_clip, transformers, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
