"""Recipes register on import (``RECIPES`` loads this package lazily)."""

from finegrain.recipes import clip, clippy, composed, detailclip, flair, grain  # noqa: F401  (imported to register)
