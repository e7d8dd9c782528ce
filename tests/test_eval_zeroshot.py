"""Zero-shot classification: packaged templates/class names, GRAIN description prompts,
class embeddings and region fusion vs naive references, metrics, dataset adapters, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext
from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.containers import ClassificationData
from finegrain.eval.datasets import load_task_data
from finegrain.eval.templates import (
    class_prompts,
    classname_sets,
    cupl_prompts,
    descriptor_sentence,
    imagenet_descriptions,
    load_descriptions,
    load_templates,
    template_sets,
)
from finegrain.eval.zeroshot import class_embeddings, classification_metrics, zeroshot_logits

from helpers.eval_toy import COLORS, ConditionedToy, PlainToy, ToyMethod, color_image


def test_packaged_templates_classnames_and_descriptions():
    sets = template_sets()
    assert len(sets) == 33 and "imagenet1k" in sets
    assert len(load_templates("default")) == 80
    assert all("{c}" in t for t in load_templates("cifar10"))
    names = classname_sets()
    assert len(names["imagenet1k"]) == 1000 and len(names["voc"]) == 20
    assert "goldfish" in cupl_prompts()
    desc = imagenet_descriptions()
    assert len(desc) > 900 and all(desc["goldfish"])
    with pytest.raises(ValueError, match="did you mean 'cifar10'"):
        load_templates("cifar1O")


def test_descriptor_sentence_rules_as_menon_vondrick():
    # the released test is startswith("a"): any word starting with "a" takes "which is"
    assert descriptor_sentence("a long tail") == "which is a long tail"
    assert descriptor_sentence("angular wings") == "which is angular wings"
    assert descriptor_sentence("has four legs") == "which has four legs"
    assert descriptor_sentence("often found in water") == "which often found in water"
    for w in ("typically", "may", "can"):
        assert descriptor_sentence(f"{w} fly") == f"which {w} fly"
    assert descriptor_sentence("used for cutting") == "which is used for cutting"
    assert descriptor_sentence("black feathers") == "which has black feathers"


def test_grain_description_prompts_per_style():
    temps = ["a photo of a {c}.", "{c}"]
    desc = {"cat": ["whiskers", "a tail"], "dog": ["has floppy ears"]}
    released = class_prompts(["cat", "dog"], temps, desc)  # descriptor outer, template inner
    assert released[0] == [
        "a photo of a cat. which has whiskers",
        "cat which has whiskers",
        "a photo of a cat. which is a tail",
        "cat which is a tail",
    ]
    assert released[1] == ["a photo of a dog. which has floppy ears", "dog which has floppy ears"]
    mv = class_prompts(["cat", "dog"], temps, desc, "menon_vondrick")
    assert mv == [
        ["cat, which has whiskers", "cat, which is a tail"],
        ["dog, which has floppy ears"],
    ]
    old = class_prompts(["cat"], temps, {"cat": ["whiskers", "a tail."]}, "which_has")
    assert old[0] == [
        "a photo of a cat which has whiskers",
        "a photo of a cat which has a tail",
        "cat which has whiskers",
        "cat which has a tail",
    ]
    with pytest.raises(ValueError, match="valid choices: released, menon_vondrick, which_has"):
        class_prompts(["cat"], temps, {"cat": ["x"]}, "paper")


def test_menon_vondrick_descriptor_file(tmp_path):
    path = tmp_path / "descriptors_toy.json"
    path.write_text(json.dumps({"red_car": ["four wheels"], "blue": ["sky colour"]}))
    got = load_descriptions(str(path), classnames=["red car", "blue"])
    assert got == {"red car": ["four wheels"], "blue": ["sky colour"]}
    with pytest.raises(ValueError, match=r"descriptors_toy.json: unknown class 'blue'"):
        load_descriptions(str(path), classnames=["red car", "green"])
    with pytest.raises(ValueError, match=r"descriptors_toy.json: no descriptors for class 'cat'"):
        load_descriptions(str(path), classnames=["red car", "blue", "cat"])
    path.write_text(json.dumps({"blue": "sky"}))
    with pytest.raises(ValueError, match=r"descriptors_toy.json: class 'blue' must map to a list"):
        load_descriptions(str(path), classnames=["blue"])


def test_description_and_class_errors_name_the_classes():
    with pytest.raises(
        ValueError, match=r"no descriptions for \['dog'\].*unknown classes \['cow'\]"
    ):
        class_prompts(["cat", "dog"], ["{c}"], {"cat": ["x"], "cow": ["y"]})
    with pytest.raises(ValueError, match=r"empty description list: \['dog'\]"):
        class_prompts(["cat", "dog"], ["{c}"], {"cat": ["x"], "dog": [" "]})
    with pytest.raises(ValueError, match="no classes"):
        class_prompts([], ["{c}"])


def test_class_embeddings_match_naive_mean():
    m = ToyMethod().eval()
    prompts = [["a red cup", "red"], ["blue sky", "a blue car", "blue"]]
    ctx = EvalContext.create(m, progress=False)
    got = class_embeddings(ctx, prompts, batch_size=2)
    plain = class_embeddings(ctx, prompts, batch_size=2, renormalize=False)
    for c, ps in enumerate(prompts):
        e = torch.stack([F.normalize(m.encode_text(m.tokenize([p]))[0], dim=0) for p in ps])
        assert torch.allclose(got[c], F.normalize(e.mean(0), dim=0), atol=1e-6)
        assert torch.allclose(plain[c], e.mean(0), atol=1e-6)


def test_class_embeddings_cached_per_context_prompts_and_length():
    m = ToyMethod().eval()
    seen: list[int] = []
    encode = m.encode_text
    m.encode_text = lambda ids, *a, **k: (seen.append(len(ids)), encode(ids, *a, **k))[1]
    prompts = [["a red cup", "red"], ["blue sky", "blue"]]
    ctx = EvalContext.create(m, progress=False)
    first = class_embeddings(ctx, prompts, batch_size=8)
    assert sum(seen) == 4  # every prompt once
    assert torch.equal(class_embeddings(ctx, prompts, batch_size=8), first) and sum(seen) == 4
    class_embeddings(ctx, [["a red cup", "red"], ["blue sky"]], batch_size=8)  # other prompts
    assert sum(seen) == 7
    class_embeddings(EvalContext.create(m, progress=False), prompts, batch_size=8)  # new run
    assert sum(seen) == 11


def test_classification_metrics_match_naive():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 7, generator=g), torch.randint(0, 7, (40,), generator=g)
    got = classification_metrics(logits, labels)
    order = [sorted(range(7), key=lambda c: -logits[i, c].item()) for i in range(40)]
    acc1 = sum(order[i][0] == labels[i] for i in range(40)) / 40
    acc5 = sum(labels[i].item() in order[i][:5] for i in range(40)) / 40
    rec = [
        sum(order[i][0] == c for i in range(40) if labels[i] == c) / (labels == c).sum().item()
        for c in range(7)
        if (labels == c).any()
    ]
    assert got["acc1"] == pytest.approx(acc1)
    assert got["acc5"] == pytest.approx(acc5)
    assert got["mean_per_class_recall"] == pytest.approx(sum(rec) / len(rec))


def _data(n: int = 2) -> ClassificationData:
    names = list(COLORS)
    images = [color_image(c, seed=i, shape="corner") for c in names for i in range(n)]
    return ClassificationData(images, [k for k in range(len(names)) for _ in range(n)], names)


@torch.no_grad()
def test_region_fusion_matches_released_loop(tmp_path):
    m, data = ToyMethod().eval(), _data()
    ctx = EvalContext.create(m, progress=False)
    templates = ["a photo of a {c}.", "{c} paint"]
    desc = {c: [f"{c} colour", "a square", "has corners"][: 1 + k] for k, c in enumerate(COLORS)}
    path = tmp_path / "descriptors_toy.json"
    path.write_text(json.dumps(desc))
    tfile = tmp_path / "templates.json"
    tfile.write_text(json.dumps(templates))
    cfg = EvalTaskConfig(
        task="zeroshot", templates=str(tfile), descriptions=str(path), fusion_alpha=0.3,
        batch_size=4,
    )  # fmt: skip
    from finegrain.eval.common import image_batches
    from finegrain.eval.zeroshot import evaluate_zeroshot

    _, out = evaluate_zeroshot(ctx, cfg, data)
    got = out["logits"]
    x = torch.cat(list(image_batches(ctx, data.images, 4, "x")))
    glob = F.normalize(m.encode_image(x).double(), dim=-1)
    reg = F.normalize(m.region_embeddings(x).double(), dim=-1)  # (N, Q, D)

    def enc(t: str) -> torch.Tensor:
        return F.normalize(m.encode_text(m.tokenize([t]))[0].double(), dim=0)

    def sentence(d: str) -> str:  # Menon & Vondrick's make_descriptor_sentence, as released
        if d.startswith("a") or d.startswith("an"):
            return " which is " + d
        if any(d.startswith(w) for w in ("has", "often", "typically", "may", "can")):
            return " which " + d
        return " which is " + d if d.startswith("used") else " which has " + d

    for c, name in enumerate(data.classnames):
        texts = [t.replace("{c}", "{}").format(name) for t in templates]
        prompts = [t + sentence(d) for d in desc[name] for t in texts]
        w = torch.stack([enc(p) for p in prompts]).mean(0)  # no renormalisation
        raw = torch.stack([enc(d) for d in desc[name]])  # (nd, D)
        for i in range(len(data.images)):
            region = sum(max(float(reg[i, q] @ e) for e in raw) for q in range(reg.shape[1]))
            region /= reg.shape[1]
            ref = 0.3 * float(glob[i] @ w) + 0.7 * region
            assert got[i, c].item() == pytest.approx(ref, abs=1e-5)


@torch.no_grad()
def test_region_fusion_max_query_option():
    m, data = ToyMethod().eval(), _data()
    ctx = EvalContext.create(m, progress=False)
    cfg = EvalTaskConfig(
        task="zeroshot", templates="plain", fusion_alpha=0.3, batch_size=4,
        region_score="max_query", class_vectors="renormalized",
    )  # fmt: skip
    prompts = [[c] for c in data.classnames]
    got = zeroshot_logits(ctx, cfg, data, prompts)
    from finegrain.eval.common import image_batches

    x = torch.cat(list(image_batches(ctx, data.images, 4, "x")))
    glob = F.normalize(m.encode_image(x).double(), dim=-1)
    reg = F.normalize(m.region_embeddings(x).double(), dim=-1)
    for c, name in enumerate(data.classnames):
        w = F.normalize(m.encode_text(m.tokenize([name]))[0].double(), dim=0)
        for i in range(len(data.images)):
            region = max(float(reg[i, q] @ w) for q in range(reg.shape[1]))
            ref = 0.3 * float(glob[i] @ w) + 0.7 * region
            assert got[i, c].item() == pytest.approx(ref, abs=1e-5)


def write_imagefolder(tmp_path, n: int = 3):
    for k, c in enumerate(COLORS):
        (tmp_path / "test" / c).mkdir(parents=True)
        for j in range(n):
            color_image(c, seed=10 * k + j).save(tmp_path / "test" / c / f"{j}.png")
    return str(tmp_path)


def test_run_zeroshot_imagefolder_templates_descriptions_fusion(tmp_path):
    root = write_imagefolder(tmp_path)
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({c: [f"{c} paint", "four corners"] for c in COLORS}))
    base = dict(task="zeroshot", dataset="imagefolder", path=root, batch_size=8)
    tasks = [
        EvalTaskConfig(**base),
        EvalTaskConfig(**base, templates="plain", descriptions=str(desc)),
        EvalTaskConfig(**base, templates="plain", fusion_alpha=0.5),
        EvalTaskConfig(**base, templates="plain", scoring="conditioned"),
    ]
    res = run_tasks(ConditionedToy(), tasks, progress=False)
    for p in ("", "/desc", "/alpha0.5", "/conditioned"):
        pre = f"zeroshot/imagefolder{p}/"
        assert res[pre + "acc1"] >= 0.8, (pre, res)  # colours are separable for the toy
        assert res[pre + "acc1"] <= res[pre + "acc5"] <= 1.0
        assert 0 <= res[pre + "mean_per_class_recall"] <= 1


def test_zeroshot_errors(tmp_path):
    root = write_imagefolder(tmp_path, 1)
    bad = tmp_path / "desc.json"
    bad.write_text(json.dumps({"red": ["x"]}))
    cfg = dict(task="zeroshot", dataset="imagefolder", path=root, templates="plain")
    strict = EvalTaskConfig(**cfg, descriptions=str(bad), missing_descriptions="error")
    with pytest.raises(ValueError, match=r"desc.json: no descriptors for class 'blue'"):
        run_tasks(ToyMethod(), [strict], progress=False)
    # default: the class without descriptors is scored by its name alone, counted and recorded
    cards: dict = {}
    task = EvalTaskConfig(**cfg, descriptions=str(bad), name="zs")
    res = run_tasks(ToyMethod(), [task], progress=False, protocols=cards)
    names = sorted(p.name for p in (tmp_path / "test").iterdir())
    assert res["zs/classes_without_descriptions"] == len(names) - 1
    assert sorted(cards["zs"]["classes_without_descriptions"]) == [n for n in names if n != "red"]
    assert 0 <= res["zs/acc1"] <= 1
    with pytest.raises(ValueError, match=r"method 'toy' \(PlainToy\) has no region_embeddings"):
        run_tasks(PlainToy(), [EvalTaskConfig(**cfg, fusion_alpha=0.5)], progress=False)
    (tmp_path / "test" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty class 'empty'"):
        load_task_data(EvalTaskConfig(**cfg))


def test_manifest_and_wds_classification(tmp_path):
    import webdataset as wds

    rows = []
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for k, c in enumerate(COLORS):
            color_image(c, seed=k).save(tmp_path / f"{c}.png")
            rows.append({"image": f"{c}.png", "label": c})
            sink.write({"__key__": f"s{k}", "png": color_image(c, seed=k), "cls": k})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(COLORS))
    d = load_task_data(
        EvalTaskConfig(
            task="zeroshot",
            dataset="manifest",
            path=str(tmp_path / "m.jsonl"),
            classnames=str(names),
        )
    )
    assert d.labels == list(range(len(COLORS))) and d.classnames == list(COLORS)
    w = load_task_data(
        EvalTaskConfig(
            task="zeroshot", dataset="wds", path=str(tmp_path / "shard.tar"), classnames=str(names)
        )
    )
    assert w.labels == list(range(len(COLORS))) and len(w.images) == len(COLORS)


def test_default_templates_for_synthetic_are_plain():
    assert load_templates("default", "synthetic") == ["{c}"]
    assert len(load_templates("default", "imagefolder")) == 80
