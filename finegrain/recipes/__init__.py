"""Recipes register on import; missing optional recipe modules are skipped."""

import importlib

for _mod in ("clip", "clippy", "flair", "grain"):
    try:
        importlib.import_module(f"finegrain.recipes.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"finegrain.recipes.{_mod}":
            raise
