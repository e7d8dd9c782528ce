"""Region classification (finegrain.eval.regions): hand-computed metrics on a COCO-style and an
LVIS-style fixture in the real file layout, every mode; RoIAlign vs a naive token average;
oracle and random methods on the built-in scenes; bad boxes counted; the CLI task syntax."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.data.config import DataConfig
from finegrain.eval import run_tasks
from finegrain.eval.common import EvalContext
from finegrain.eval.config import EvalTaskConfig, RegionTaskConfig
from finegrain.eval.region_data import RegionData, load_instances, synthetic_regions
from finegrain.eval.regions import evaluate_regions, match_boxes, pool_regions
from finegrain.eval_cli import parse_task
from finegrain.methods.base import Method

from helpers.eval_toy import PlainToy, ToyConfig, ToyMethod

# signed colour vectors 2 * rgb - 1: grey background is ~0, so it never moves a direction
SIGNED = {
    "red": (1, -1, -1),
    "green": (-1, 1, -1),
    "blue": (-1, -1, 1),
    "yellow": (1, 1, -1),
    "cyan": (-1, 1, 1),
    "magenta": (1, -1, 1),
}
NAMES = list(SIGNED)
RGB = {n: tuple(255 * (v + 1) // 2 for v in s) for n, s in SIGNED.items()}


class SignedColour(Method):
    """Image/region/dense embedding = mean signed colour (2 * rgb - 1); text = the signed
    colour of a colour name; regions = the four quadrants with their boxes."""

    Config = ToyConfig

    def __init__(self) -> None:
        super().__init__(ToyConfig())
        d = DataConfig()
        self.register_buffer("mean", torch.tensor(d.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(d.std).view(1, 3, 1, 1))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[NAMES.index(t)] for t in texts])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(torch.tensor([SIGNED[NAMES[int(t)]] for t in tokens[:, 0]]).float())

    def signed(self, images: torch.Tensor) -> torch.Tensor:
        return 2 * (images * self.std + self.mean) - 1  # (B, 3, H, W)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.signed(images).mean((2, 3)), dim=-1)

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.signed(images), 4)  # (B, 3, H/4, W/4) tokens of 4x4 pixels

    def region_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        q = F.adaptive_avg_pool2d(self.signed(images), 2).flatten(2).transpose(1, 2)
        return F.normalize(q, dim=-1)  # (B, 4, 3): TL, TR, BL, BR

    def predict_boxes(self, images: torch.Tensor) -> torch.Tensor:
        quads = torch.tensor(
            [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
        )
        return quads.expand(images.shape[0], 4, 4)


def _image(size, rects):
    arr = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
    for name, (x, y, w, h) in rects:
        arr[y : y + h, x : x + w] = RGB[name]
    return Image.fromarray(arr)


# (image size, rectangles actually drawn, annotations: (category, bbox [x, y, w, h], extra))
SCENES = [
    ((48, 40), [("red", (4, 4, 20, 16)), ("blue", (28, 22, 16, 14))],
     [("red", [4, 4, 20, 16], {}), ("blue", [28, 22, 16, 14], {})]),
    ((40, 40), [("green", (2, 2, 14, 14)), ("cyan", (22, 22, 14, 14))],
     [("yellow", [2, 2, 14, 14], {}), ("red", [22, 22, 14, 14], {})]),  # both wrong labels
    ((64, 48), [("magenta", (4, 26, 20, 18)), ("yellow", (50, 4, 14, 14))],
     [("magenta", [4, 26, 20, 18], {}), ("yellow", [50, 4, 20, 14], {}),  # clipped at x=64
      ("red", [70, 10, 5, 5], {}), ("red", [10, 10, 0, 5], {}),  # outside, zero area
      ("red", [10, 10, -5, 5], {}), ("red", "7,7,2,2", {}), ("blue", [0, 0, 8, 8], {"iscrowd": 1}),
      ("blue", [0, 0, 8, 8], {"category_id": 99})]),
]  # fmt: skip
# hand-computed: 6 usable boxes; correct: red, blue, magenta, yellow; green-as-yellow ranks
# yellow 2nd (top-5 hit), cyan-as-red ranks red last of 6 (top-5 miss).
# per class recall: red 1/2, blue 1, yellow 1/2, magenta 1 -> mean 0.75
EXPECTED = {
    "acc1": 4 / 6,
    "acc5": 5 / 6,
    "mean_per_class_recall": 0.75,
    "skipped_box_outside": 1,
    "skipped_degenerate": 3,
    "clipped_boxes": 1,
    "skipped_crowd": 1,
    "skipped_unknown_category": 1,
    "skipped_unknown_image": 1,
}
FREQ = {"red": "f", "green": "r", "blue": "c", "yellow": "r", "cyan": "c", "magenta": "f"}


def write_instances(root, lvis=False):
    """A COCO instances JSON (``annotations/instances_val2017.json`` + ``val2017/``) or an LVIS
    JSON (images named by ``coco_url`` only, categories with ``frequency``)."""
    (root / "val2017").mkdir(parents=True)
    cats = [{"id": 10 + i, "name": n} for i, n in enumerate(NAMES)]
    if lvis:
        cats = [{**c, "frequency": FREQ[c["name"]]} for c in cats]
    images, anns = [], []
    for i, (size, rects, ann) in enumerate(SCENES):
        name = f"{i:012d}.png"
        _image(size, rects).save(root / "val2017" / name)
        im = {"id": 100 + i, "width": size[0], "height": size[1]}
        im.update(
            {"coco_url": f"http://images.cocodataset.org/val2017/{name}"}
            if lvis
            else {"file_name": name}
        )
        images.append(im)
        for cat, bbox, extra in ann:
            a = {"id": len(anns), "image_id": 100 + i, "bbox": bbox, "iscrowd": 0}
            a["category_id"] = 10 + NAMES.index(cat)
            anns.append({**a, **extra})
    images.append({"id": 999, "file_name": "no_annotations.png", "width": 8, "height": 8})
    anns.append({"id": len(anns), "image_id": 12345, "bbox": [0, 0, 4, 4], "category_id": 10})
    path = root / ("lvis_v1_val.json" if lvis else "annotations/instances_val2017.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _ctx(method):
    return EvalContext.create(method, progress=False)


@pytest.mark.parametrize(
    "mode, opts",
    [("crop", {}), ("crop", {"margin": 0.1, "square": False}), ("roialign", {}),
     ("roialign", {"roi_size": 2}), ("regions", {}), ("regions", {"region_scoring": "released"})],
)  # fmt: skip
def test_coco_fixture_hand_computed(tmp_path, mode, opts):
    path = write_instances(tmp_path)
    data = load_instances(path)
    assert len(data.images) == 3 and data.classnames == NAMES  # the unannotated image is left out
    cfg = RegionTaskConfig(dataset="coco", path=str(path), mode=mode, templates="plain", **opts)
    metrics, art = evaluate_regions(_ctx(SignedColour()), cfg, data)
    for k, v in EXPECTED.items():
        assert metrics[k] == pytest.approx(v), k
    card = art["protocol"]
    assert card["n_images"] == 3 and card["n_regions"] == 6 and card["mode"] == mode
    assert card["chance"] == pytest.approx(
        {"acc1": 1 / 6, "acc5": 5 / 6, "mean_per_class_recall": 1 / 6}
    )
    assert card["skipped_box_outside"] == 1 and card["skipped_degenerate"] == 3
    assert card["templates"] == "plain" and card["n_templates"] == 1
    assert art["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    if mode == "regions" and not opts:
        assert metrics["unmatched_regions"] == 0 and 0 < metrics["matched_iou"] < 1


def test_lvis_frequency_split(tmp_path):
    write_instances(tmp_path, lvis=True)
    cfg = EvalTaskConfig(
        task="region", dataset="lvis", path=str(tmp_path), mode="roialign", templates="plain"
    )
    results = run_tasks(SignedColour(), [cfg], progress=False)
    r = {k.removeprefix("region/lvis/roialign/"): v for k, v in results.items()}
    # rare: yellow (wrong, right), green (no box); common: blue (right); frequent: red (right,
    # wrong), magenta (right)
    assert r["acc1_r"] == pytest.approx(0.5) and r["mean_per_class_recall_r"] == pytest.approx(0.5)
    assert r["acc1_c"] == pytest.approx(1.0) and r["mean_per_class_recall_c"] == pytest.approx(1.0)
    assert r["acc1_f"] == pytest.approx(2 / 3)
    assert r["mean_per_class_recall_f"] == pytest.approx(0.75)
    assert r["acc1"] == pytest.approx(4 / 6) and r["skipped_crowd"] == 1


def test_loader_limit_and_missing_images(tmp_path):
    path = write_instances(tmp_path)
    one = load_instances(path, limit=1)
    assert len(one.images) == 1 and one.labels == [[0, 2]]
    assert sum(one.counts.values()) == 0  # the skipped annotations belong to other images
    (tmp_path / "val2017" / "000000000001.png").unlink()
    with pytest.raises(ValueError, match="000000000001.png referenced by"):
        load_instances(path)
    with pytest.raises(ValueError, match="not a COCO-style instance file"):
        (tmp_path / "bad.json").write_text("[]")
        load_instances(tmp_path / "bad.json")


def test_all_boxes_bad_is_one_line_error(tmp_path):
    data = RegionData([_image((16, 16), [])], [[[20, 20, 30, 30], [1, 1, 1, 5]]], [[0, 1]], NAMES)
    cfg = RegionTaskConfig(dataset="coco", mode="crop", templates="plain")
    with pytest.raises(ValueError, match="no usable box among 2 .*1 skipped_box_outside"):
        evaluate_regions(_ctx(SignedColour()), cfg, data)


@pytest.mark.parametrize("roi_size", [1, 2])
def test_roialign_equals_naive_token_average(roi_size):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)  # (B, D, h, w)
    sizes = [(96, 64), (40, 40)]  # tokens of 24 x 16 and 10 x 10 pixels
    boxes = [
        torch.tensor([[24.0, 16.0, 72.0, 48.0], [0.0, 0.0, 48.0, 64.0]], dtype=torch.float64),
        torch.tensor([[10.0, 20.0, 30.0, 40.0]], dtype=torch.float64),
    ]
    got = pool_regions(dense, boxes, sizes, roi_size)  # (3, D)
    want = torch.stack(
        [
            dense[0, :, 1:3, 1:3].mean((1, 2)),  # token rows 1-2, columns 1-2
            dense[0, :, 0:4, 0:2].mean((1, 2)),
            dense[1, :, 2:4, 1:3].mean((1, 2)),
        ]
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_match_boxes_highest_iou_then_nearest_centre():
    pred = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0.9, 0.9, 1, 1]])
    gt = torch.tensor([[0.55, 0.5, 1, 1], [0.1, 0.1, 0.3, 0.3], [0.82, 0.82, 0.88, 0.88]])
    idx, iou = match_boxes(gt, pred)
    assert idx.tolist()[:2] == [1, 0] and iou[1] == pytest.approx(0.16)
    assert iou[2] == pytest.approx((0.06 * 0.06) / 0.25) and idx[2] == 1  # inside box 1
    idx, iou = match_boxes(torch.tensor([[0.6, 0.0, 0.7, 0.1]]), pred)
    assert iou.item() == 0 and idx.item() == 0  # no overlap: the nearest centre (0.25, 0.25)


# ---- the built-in scenes ----------------------------------------------------------------------
def _code_scenes(data: RegionData, masks: list[np.ndarray]) -> RegionData:
    """Repaint every object in a colour that encodes its class: R / G = (c + 1) / 25 (a ratio
    that blending with the black background does not change)."""
    images = []
    for mask, labels in zip(masks, data.labels):
        arr = np.zeros((*mask.shape, 3), dtype=np.uint8)
        for j, c in enumerate(labels):
            arr[mask == j + 1] = (8 * (c + 1), 200, 0)
        images.append(Image.fromarray(arr))
    return RegionData(images, data.boxes, data.labels, data.classnames)


class Oracle(SignedColour):
    """Decodes the class colour of every pixel: dense = one-hot per pixel (0 = background),
    image = the class histogram; text = one-hot of the class name."""

    def __init__(self, classnames: list[str]) -> None:
        super().__init__()
        self.classnames = classnames

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.classnames.index(t)] for t in texts])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], len(self.classnames)).float()

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images * self.std + self.mean) * 255  # (B, 3, H, W)
        obj = rgb[:, 1] > 100
        c = (
            (rgb[:, 0] / rgb[:, 1].clamp_min(1) * 25 - 1)
            .round()
            .long()
            .clamp(0, len(self.classnames) - 1)
        )
        return F.one_hot(c, len(self.classnames)).permute(0, 3, 1, 2).float() * obj[:, None]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.dense_features(images).sum((2, 3)), dim=-1)


class RandomDense(Oracle):
    """Random text vectors and a random projection of 8x8-pixel colour means."""

    def __init__(self, classnames: list[str]) -> None:
        super().__init__(classnames)
        g = torch.Generator().manual_seed(1)
        self.pix = torch.randn(3, 16, generator=g)
        self.txt = torch.randn(len(classnames), 16, generator=g)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.txt[tokens[:, 0]], dim=-1)

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,cd->bdhw", F.avg_pool2d(images, 8), self.pix)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.dense_features(images).mean((2, 3)), dim=-1)


@pytest.fixture(scope="module")
def scenes():
    data = synthetic_regions("shape", 48, image_size=32)
    from finegrain.data.synthetic_sets import eval_split

    masks = eval_split("regions", 48, image_size=32)["instance_masks"]
    return data, masks


def test_builtin_scenes_match_the_generator(scenes):
    data, masks = scenes
    assert data.classnames[0] == "circle" and len(data.classnames) == 14
    for boxes, labels, mask in zip(data.boxes, data.labels, masks):
        for j, (box, _) in enumerate(zip(boxes, labels)):
            ys, xs = np.nonzero(mask == j + 1)  # the box is the tight box of the object
            assert box == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    colour = synthetic_regions("color", 4, image_size=32)
    assert colour.boxes == data.boxes[:4] and colour.labels != data.labels[:4]
    with pytest.raises(ValueError, match="valid choices: shape, color"):
        synthetic_regions("size", 4, image_size=32)


@pytest.mark.parametrize("mode, opts", [("roialign", {}), ("crop", {"square": False})])
def test_oracle_scores_100_and_random_near_chance(scenes, mode, opts):
    data, masks = scenes
    coded = _code_scenes(data, masks)
    cfg = RegionTaskConfig(mode=mode, **opts)
    metrics, art = evaluate_regions(_ctx(Oracle(data.classnames)), cfg, coded)
    assert art["protocol"]["n_regions"] == data.num_boxes > 80
    assert metrics["acc1"] == 1.0 and metrics["mean_per_class_recall"] == 1.0
    rnd, _ = evaluate_regions(_ctx(RandomDense(data.classnames)), cfg, data)
    assert rnd["acc1"] < 0.2 and 0.15 < rnd["acc5"] < 0.6  # chance 1/14, 5/14


def test_cli_task_syntax_and_prefix():
    cfg = parse_task("region:synthetic@mode=roialign@margin=0.25@num_samples=6")
    assert isinstance(cfg, RegionTaskConfig) and cfg.mode == "roialign" and cfg.margin == 0.25
    with pytest.raises(ValueError, match="valid choices"):
        parse_task("region:synthetic@mode=box")
    tasks = [cfg, parse_task("region:synthetic/color@num_samples=6")]
    results = run_tasks(ToyMethod(), tasks, progress=False)
    assert "region/synthetic/roialign+margin0.25/acc1" in results
    assert "region/synthetic/color+crop/skipped_box_outside" in results


class Counting(ToyMethod):
    calls = 0

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        Counting.calls += images.shape[0]
        return super().dense_features(images)


def test_dense_features_computed_once_per_image_across_tasks():
    spec = "region:synthetic{}@mode=roialign@num_samples=6@feature_cache_mb={}"
    tasks = [parse_task(spec.format(v, 64)) for v in ("", "/color")]
    tasks.append(parse_task(spec.format("", 64) + "@margin=0.5"))
    cached = run_tasks(Counting(), tasks, progress=False)
    assert Counting.calls == 6  # the shape and colour variants are the same six scenes
    Counting.calls = 0
    fresh = run_tasks(Counting(), [parse_task(spec.format(v, 0)) for v in ("", "/color")], progress=False)  # fmt: skip
    assert Counting.calls == 12
    for key, value in fresh.items():
        if not key.endswith("seconds"):
            assert cached[key] == pytest.approx(value, abs=1e-6), key


def test_capability_errors():
    for mode, what in (("roialign", "dense_features"), ("regions", "region_embeddings")):
        with pytest.raises(ValueError, match=what):
            run_tasks(PlainToy(), [RegionTaskConfig(mode=mode, num_samples=2)], progress=False)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        run_tasks(SignedColour(), [RegionTaskConfig(margin=-1, num_samples=2)], progress=False)
