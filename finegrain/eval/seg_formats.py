"""Folder loaders of semantic-segmentation benchmarks beyond VOC (``formats.load_voc``), in
the layouts the datasets ship in (as mmsegmentation prepares them). Masks are remapped lazily
(``MappedMask``) to finegrain's convention: 0 = background, 1 + c = class c, 255 = ignore.

- COCO-Stuff 164k (Caesar et al. 2018): ``images/{train2017,val2017}/*.jpg`` and
  ``annotations/<same>/`` either ``*_labelTrainIds.png`` (train ids 0..170, 255 unlabeled;
  mmseg's converted maps) or the released ``*.png`` stuffthingmaps (COCO ids - 1 in 0..181,
  with 11 unused thing ids; 255 unlabeled), mapped to the 171 train ids by rank. There is
  no background class: every pixel is one of 171 classes or ignored.
- ADE20K SceneParsing (Zhou et al. 2017): ``images/{training,validation}/*.jpg`` and
  ``annotations/<same>/*.png`` with 0 = "other" (ignored) and 1..150 the classes; names from
  ``objectInfo150.csv`` (``Idx,Ratio,Train,Val,Name`` with ``;``-separated synonyms) or
  ``objectInfo150.txt`` (tab-separated, ``, ``-separated synonyms) next to them when present
  (first synonym), else the built-in 150.
Split names ``val`` / ``train`` map to each dataset's folder names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.eval.containers import ImageItem, MappedMask

COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # thing ids without labels
SPLITS = {
    "coco_stuff": {"val": "val2017", "train": "train2017", "test": "val2017"},
    "ade20k": {"val": "validation", "train": "training", "test": "validation"},
}

COCO_STUFF_CLASSES = tuple(  # 171 train ids in order
    n.strip()
    for n in (
        "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, "
        "fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, "
        "elephant, bear, zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee,"
        " skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, "
        "surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana,"
        " apple, sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake, chair, "
        "couch, potted plant, bed, dining table, toilet, tv, laptop, mouse, remote, keyboard,"
        " cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, "
        "scissors, teddy bear, hair drier, toothbrush, banner, blanket, branch, bridge, "
        "building-other, bush, cabinet, cage, cardboard, carpet, ceiling-other, ceiling-tile,"
        " cloth, clothes, clouds, counter, cupboard, curtain, desk-stuff, dirt, door-stuff, "
        "fence, floor-marble, floor-other, floor-stone, floor-tile, floor-wood, flower, fog, "
        "food-other, fruit, furniture-other, grass, gravel, ground-other, hill, house, "
        "leaves, light, mat, metal, mirror-stuff, moss, mountain, mud, napkin, net, paper, "
        "pavement, pillow, plant-other, plastic, platform, playingfield, railing, railroad, "
        "river, road, rock, roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow, "
        "solid-other, stairs, stone, straw, structural-other, table, tent, textile-other, "
        "towel, tree, vegetable, wall-brick, wall-concrete, wall-other, wall-panel, "
        "wall-stone, wall-tile, wall-wood, water-other, waterdrops, window-blind, "
        "window-other, wood"
    ).split(",")
)
ADE20K_CLASSES = tuple(  # objectInfo150, first synonyms
    n.strip()
    for n in (
        "wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, "
        "sidewalk, person, earth, door, table, mountain, plant, curtain, chair, car, water, "
        "painting, sofa, shelf, house, sea, mirror, rug, field, armchair, seat, fence, desk, "
        "rock, wardrobe, lamp, bathtub, railing, cushion, base, box, column, signboard, chest"
        " of drawers, counter, sand, sink, skyscraper, fireplace, refrigerator, grandstand, "
        "path, stairs, runway, case, pool table, pillow, screen door, stairway, river, "
        "bridge, bookcase, blind, coffee table, toilet, flower, book, hill, bench, "
        "countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar, arcade "
        "machine, hovel, bus, towel, light, truck, tower, chandelier, awning, streetlight, "
        "booth, television receiver, airplane, dirt track, apparel, pole, land, bannister, "
        "escalator, ottoman, bottle, buffet, poster, stage, van, ship, fountain, conveyer "
        "belt, canopy, washer, plaything, swimming pool, stool, barrel, basket, waterfall, "
        "tent, bag, minibike, cradle, oven, ball, food, step, tank, trade name, microwave, "
        "pot, animal, bicycle, lake, dishwasher, screen, blanket, sculpture, hood, sconce, "
        "vase, traffic light, tray, ashcan, fan, pier, crt screen, plate, monitor, bulletin "
        "board, shower, radiator, glass, clock, flag"
    ).split(",")
)


def coco_stuff_lut(train_ids: bool) -> np.ndarray:
    """(256,) label map of COCO-Stuff masks to 1 + train id (255 stays ignore)."""
    lut = np.full(256, 255, dtype=np.int64)
    if train_ids:
        lut[:171] = np.arange(1, 172)
    else:
        used = [i for i in range(182) if i not in COCO_STUFF_UNUSED]  # 171 ids
        lut[used] = np.arange(1, 172)
    return lut


def ade_lut() -> np.ndarray:
    """(256,) ADE20K: 0 ('other') -> ignore, 1..150 stay."""
    lut = np.full(256, 255, dtype=np.int64)
    lut[1:151] = np.arange(1, 151)
    return lut


def _split_dir(path: Path, dataset: str, split: str) -> str:
    folder = SPLITS[dataset].get(split, split)
    if not (path / "images" / folder).is_dir():
        raise ValueError(
            f"{dataset}: no images/{folder} under {path} (split '{split}'; "
            f"expected images/ and annotations/ with {', '.join(sorted(set(SPLITS[dataset].values())))})"
        )
    return folder


def _pairs(path: Path, folder: str, suffix: str) -> tuple[list[ImageItem], list[Path]]:
    ann_dir = path / "annotations" / folder
    masks = sorted(ann_dir.glob(f"*{suffix}"))
    if not masks:
        raise ValueError(f"no '*{suffix}' masks under {ann_dir}")
    images = [path / "images" / folder / f"{m.name[: -len(suffix)]}.jpg" for m in masks]
    missing = [im for im in images if not im.is_file()]
    if missing:
        raise ValueError(f"image {missing[0]} of mask {ann_dir} not found ({len(missing)} missing)")
    return images, masks


def load_coco_stuff(path: Path, split: str) -> tuple[list[ImageItem], list[MappedMask], list[str]]:
    """COCO-Stuff folder (module docstring); train-id maps preferred when both exist."""
    folder = _split_dir(path, "coco_stuff", split)
    train_ids = any((path / "annotations" / folder).glob("*_labelTrainIds.png"))
    images, masks = _pairs(path, folder, "_labelTrainIds.png" if train_ids else ".png")
    lut = coco_stuff_lut(train_ids)
    return images, [MappedMask(m, lut) for m in masks], list(COCO_STUFF_CLASSES)


def ade_names(path: Path) -> list[str]:
    """The 150 names of ``objectInfo150.csv`` / ``.txt`` in ``path``, else the built-in ones."""
    for name, sep, syn in (("objectInfo150.csv", ",", ";"), ("objectInfo150.txt", "\t", ",")):
        f = path / name
        if f.is_file():
            rows = [r for r in f.read_text().splitlines()[1:] if r.strip()]
            names = [r.split(sep, 4)[-1].strip().strip('"').split(syn)[0].strip() for r in rows]
            if len(names) != 150:
                raise ValueError(f"{f} lists {len(names)} classes, expected 150")
            return names
    return list(ADE20K_CLASSES)


def load_ade20k(path: Path, split: str) -> tuple[list[ImageItem], list[MappedMask], list[str]]:
    """ADE20K SceneParsing folder (module docstring)."""
    folder = _split_dir(path, "ade20k", split)
    images, masks = _pairs(path, folder, ".png")
    lut = ade_lut()
    return images, [MappedMask(m, lut) for m in masks], ade_names(path)
