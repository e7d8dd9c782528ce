"""``memo_scenes``: rendered built-in scenes kept and handed back (what ``finegrain demo`` uses
to render each scene once for all methods), equal to fresh renders and safe to change."""

from __future__ import annotations

import numpy as np

from finegrain.data import synthetic_sets
from finegrain.data.config import SyntheticConfig
from finegrain.data.synthetic_sets import SyntheticScenes, eval_split, memo_scenes


def _count_renders(monkeypatch) -> list[int]:
    """Count scene renders where ``synthetic_sets`` calls them: training scenes go through
    ``training_scene`` (ordinary or spurious), eval splits through ``generate_scene``."""
    calls = [0]
    for name in ("generate_scene", "training_scene"):
        real = getattr(synthetic_sets, name)

        def counting(*args, _real=real, **kwargs):
            calls[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(synthetic_sets, name, counting)
    return calls


def test_training_scenes_render_once_and_equal_fresh_ones(monkeypatch):
    calls = _count_renders(monkeypatch)
    scenes = SyntheticScenes(SyntheticConfig(num_samples=4, seed=3), image_size=32)
    fresh = [scenes.raw(i) for i in range(4)]
    assert calls[0] == 4
    with memo_scenes() as memo:
        first = [scenes.raw(i) for i in range(4)]
        first[0]["record"]["caption"] = "changed by a caller"
        again = [scenes.raw(i) for i in (0, 1, 2, 3, 1)]
    assert calls[0] == 8 and len(memo) == 4  # the second pass rendered nothing
    for a, b in zip(fresh + fresh[1:2], again, strict=True):
        assert a["key"] == b["key"] and a["record"] == b["record"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    scenes.raw(0)  # outside the context: rendered again
    assert calls[0] == 9


def test_eval_splits_are_kept_whole_and_copied(monkeypatch):
    fresh = eval_split("segmentation", 3, image_size=32)
    with memo_scenes() as memo:
        a = eval_split("segmentation", 3, image_size=32)
        a["masks"][0][:] = 0
        b = eval_split("segmentation", 3, image_size=32)
        assert len(memo) == 1
    for want, got in zip(fresh["masks"], b["masks"], strict=True):
        assert np.array_equal(want, got)
    assert fresh["classnames"] == b["classnames"] and fresh["boxes"] == b["boxes"]
