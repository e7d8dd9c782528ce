"""OpenCLIP's hub config format (``open_clip_config.json``: ``{"model_cfg", "preprocess_cfg"}``)
is accepted wherever a model-config ``.json`` is (issue 29; it was refused as an unknown
open_clip model)."""

from __future__ import annotations

import json

import pytest
import torch

from finegrain.interop import load_method_spec

from helpers.interop import OC_CFG, TEXTS, close, open_clip_reference

pytest.importorskip("open_clip")
PRE = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_hub_config_json_loads_like_a_model_config(tmp_path):
    ref, _ = open_clip_reference(tmp_path / "ref")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_CFG,
                                                          "preprocess_cfg": PRE}))  # fmt: skip
    torch.save(ref.state_dict(), hub / "weights.pt")
    method, cfg = load_method_spec(
        f"open_clip:{hub / 'open_clip_config.json'}={hub / 'weights.pt'}"
    )
    assert cfg.data.mean == (0.5, 0.5, 0.5) and cfg.data.std == (0.25, 0.25, 0.25)
    x = torch.randn(2, 3, 32, 32)
    ids = method.tokenize(TEXTS)
    with torch.no_grad():
        assert close(method.encode_image(x, normalize=False), ref.encode_image(x))
        assert close(method.encode_text(ids, normalize=False), ref.encode_text(ids))


def test_two_hub_configs_with_one_file_name_stay_apart(tmp_path):
    from finegrain.encoders.open_clip_tower import register_model_config

    names = []
    for i, width in enumerate((32, 64)):
        d = tmp_path / str(i)
        d.mkdir()
        cfg = {**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "width": width}}
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        names.append(register_model_config(d / "open_clip_config.json"))
    assert names[0] != names[1] and all(n.startswith("open_clip_config-") for n in names)
    import open_clip

    widths = [open_clip.get_model_config(n)["vision_cfg"]["width"] for n in names]
    assert widths == [32, 64]
