"""`finegrain annotate` end to end with tiny random HF models built here (no downloads)."""

from __future__ import annotations

import io
import json
import string
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from finegrain.annotate.cli import main as annotate_main
from finegrain.annotate.parse import parse_description
from finegrain.annotate.pipeline import AnnotateConfig, annotate, read_shard

pytest.importorskip("transformers")
webdataset = pytest.importorskip("webdataset")


# ---- parser on canned answers ---------------------------------------------------------
def test_parse_json_object_in_fences() -> None:
    text = 'Sure!\n```json\n{"caption": "A red circle  on grass.", "regions": ["red circle", {"text": "green grass"}, "red circle"]}\n```'
    p = parse_description(text)
    assert p.ok and p.caption == "A red circle on grass."
    assert p.regions == ["red circle", "green grass"], "dict items read, duplicates dropped"


def test_parse_list_bullets_and_garbage() -> None:
    assert parse_description('["a dog", "a ball"]').regions == ["a dog", "a ball"]
    p = parse_description("A dog plays.\nObjects:\n- a brown dog.\n2) a red ball\n* grass")
    assert (
        p.ok and p.caption == "A dog plays." and p.regions == ["a brown dog", "a red ball", "grass"]
    )
    bad = parse_description("f p y k b - e {not json")
    assert not bad.ok and bad.regions == []
    assert (
        len(parse_description("\n".join(f"- item {i}" for i in range(30)), max_regions=4).regions)
        == 4
    )


# ---- tiny models ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    try:  # transformers 5: from the vocabulary itself
        tok = CLIPTokenizer(vocab=vocab, merges=[])
    except TypeError:  # transformers 4.x: only from vocab.json + merges.txt files
        d = tmp_path_factory.mktemp("clip_tokenizer")
        (d / "vocab.json").write_text(json.dumps(vocab))
        (d / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"))
    size = {"height": 32, "width": 32}
    proc = OwlViTProcessor(
        image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tok
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)  # fmt: skip
    model = OwlViTForObjectDetection(
        OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    d = tmp_path_factory.mktemp("owl")
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,  # fmt: skip
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = [
        "<unk>",
        "<pad>",
        "<s>",
        "</s>",
        "<image>",
        "USER:",
        "ASSISTANT:",
        "[",
        "]",
        '"',
        "-",
        "{",
        "}",
    ]
    vocab = {w: i for i, w in enumerate(words + list(string.ascii_lowercase))}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    tmpl = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")  # fmt: skip
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="full",
                          chat_template=tmpl, num_additional_image_tokens=1)  # fmt: skip
    vision = CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=2, eos_token_id=3, pad_token_id=1)  # fmt: skip
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                      vision_feature_select_strategy="full", vision_feature_layer=-1)  # fmt: skip
    d = tmp_path_factory.mktemp("llava")
    LlavaForConditionalGeneration(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return d


def write_shard(path: Path, n: int, start: int = 0, broken: int = -1) -> None:
    with webdataset.TarWriter(str(path)) as sink:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.new("RGB", (40 + i, 32), (30 * i % 255, 80, 160)).save(buf, format="JPEG")
            jpg = b"not a jpeg" if i == broken else buf.getvalue()
            sink.write({"__key__": f"{i:06d}", "jpg": jpg, "txt": f"alt {i}".encode(),
                        "json": json.dumps({"url": f"u{i}"}).encode()})  # fmt: skip


class CannedDescriber:
    """A Describer that answers like a well-behaved MLLM (alternating JSON / bullets / junk)."""

    def __init__(self) -> None:
        self.calls = 0

    def describe(self, images: list[Image.Image]) -> list[str]:
        out = []
        for _ in images:
            k = self.calls % 3
            self.calls += 1
            if k == 0:
                out.append(
                    '{"caption": "a long caption", "regions": ["red circle", "blue square"]}'
                )
            elif k == 1:
                out.append("A caption.\n- green star")
            else:
                out.append("???")
        return out


def check_regions(regions: list[dict]) -> None:
    for r in regions:
        assert set(r) == {"text", "box", "score"}
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, r
        assert r["score"] >= 0.0


def test_pipeline_hf_models_jsonl_and_resume(
    tmp_path: Path, owl_dir: Path, llava_dir: Path
) -> None:
    for s in range(3):
        write_shard(tmp_path / f"in-{s}.tar", 3, start=3 * s, broken=4)
    out = tmp_path / "out"
    cfg = AnnotateConfig(input=str(tmp_path / "in-{0..2}.tar"), output_dir=str(out), describer=str(llava_dir),
                         detector=str(owl_dir), max_new_tokens=6, batch_size=2, box_threshold=0.0,
                         rank=0, world_size=2, progress=False)  # fmt: skip
    stats = annotate(cfg)
    assert stats["shards_assigned"] == 2 and sorted(p.name for p in out.iterdir()) == [
        "in-0.jsonl",
        "in-2.jsonl",
    ]
    assert stats["samples"] == 6 and stats["broken"] == 0
    # a random MLLM writes junk: counted, samples kept without regions
    assert stats["unparseable"] + stats["descriptions"] > 0
    rec = [json.loads(x) for x in (out / "in-0.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rec] == ["000000", "000001", "000002"]
    for r in rec:
        assert {"key", "long_caption", "regions", "annotation"} <= set(r)
        check_regions(r["regions"])
    # rank 1 gets the middle shard (with a broken image); then a rerun of rank 0 skips all
    s1 = annotate(AnnotateConfig(**{**cfg.__dict__, "rank": 1}))
    assert s1["samples"] == 3 and s1["broken"] == 1
    again = annotate(cfg)
    assert again.get("shards_skipped") == 2 and again.get("samples", 0) == 0


def test_pipeline_grounds_descriptions_wds_and_key_resume(tmp_path: Path, owl_dir: Path) -> None:
    from finegrain.annotate.models import HFGrounder

    write_shard(tmp_path / "a.tar", 6)
    out = tmp_path / "o"
    out.mkdir()
    # an interrupted JSONL run: two keys already written (and a torn line)
    (out / "a.jsonl.partial").write_text(
        json.dumps({"key": "000000", "long_caption": "", "regions": [], "annotation": {}}) + "\n"
        + json.dumps({"key": "000001", "long_caption": "", "regions": [], "annotation": {}}) + "\n{\"key\": \"0000"
    )  # fmt: skip
    grounder = HFGrounder(str(owl_dir), threshold=0.0)
    cfg = AnnotateConfig(
        input=str(tmp_path / "a.tar"), output_dir=str(out), batch_size=4, progress=False
    )
    stats = annotate(cfg, describer=CannedDescriber(), grounder=grounder)
    assert stats["resumed_keys"] == 2 and stats["samples"] == 4
    assert stats["unparseable"] == 1 and stats["descriptions"] == 5
    assert (
        stats["grounded"] + stats["below_threshold"] == 5 and stats["grounded"] >= 2
    )  # degenerate boxes dropped
    lines = [json.loads(x) for x in (out / "a.jsonl").read_text().splitlines()]
    assert [r["key"] for r in lines] == [f"{i:06d}" for i in range(6)]
    assert [r["text"] for r in lines[2]["regions"]] in (
        ["red circle", "blue square"],
        ["red circle"],
        ["blue square"],
    )
    assert lines[3]["long_caption"] == "A caption." and len(lines[3]["regions"]) <= 1
    assert lines[4]["regions"] == [] and lines[4]["annotation"]["status"] == "unparseable"
    check_regions(lines[2]["regions"] + lines[3]["regions"])
    # new shards in the sample schema; a threshold above every sigmoid score grounds nothing
    cfg_w = AnnotateConfig(input=str(tmp_path / "a.tar"), output_dir=str(tmp_path / "w"), output_format="wds",
                           progress=False)  # fmt: skip
    annotate(cfg_w, describer=CannedDescriber(), grounder=grounder)
    samples = list(read_shard(str(tmp_path / "w" / "a.tar")))
    assert len(samples) == 6 and all({"jpg", "txt", "json"} <= set(s) for s in samples)
    meta = json.loads(samples[0]["json"])
    assert (
        meta["url"] == "u0"
        and meta["long_caption"] == "a long caption"
        and 1 <= len(meta["regions"]) <= 2
    )
    check_regions(meta["regions"])
    strict = annotate(AnnotateConfig(**{**cfg_w.__dict__, "output_dir": str(tmp_path / "s")}),
                      describer=CannedDescriber(), grounder=HFGrounder(str(owl_dir), threshold=1.01))  # fmt: skip
    assert strict["grounded"] == 0 and strict["below_threshold"] == strict["descriptions"] == 6


def test_cli_errors_and_run(
    tmp_path: Path, owl_dir: Path, llava_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    write_shard(tmp_path / "x.tar", 2)
    rc = annotate_main(["--input", str(tmp_path / "nope-*.tar"), "--output-dir", str(tmp_path / "o"),
                        "--describer", str(llava_dir), "--detector", str(owl_dir)])  # fmt: skip
    assert rc == 2 and "no input shards" in capsys.readouterr().err
    rc = annotate_main(["--input", str(tmp_path / "x.tar"), "--output-dir", str(tmp_path / "o"),
                        "--describer", str(tmp_path / "missing"), "--detector", str(owl_dir)])  # fmt: skip
    assert rc == 2 and "local model directory" in capsys.readouterr().err
    rc = annotate_main(["--input", str(tmp_path / "x.tar"), "--output-dir", str(tmp_path / "o"), "--describer",
                        str(llava_dir), "--detector", str(owl_dir), "--max-new-tokens", "4", "--no-progress",
                        "--merge-to", str(tmp_path / "side.jsonl")])  # fmt: skip
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and stats["samples"] == 2 and stats["merged_lines"] == 2
    from finegrain.data.sources import load_sidecar

    side = load_sidecar(str(tmp_path / "side.jsonl"))  # the data pipeline reads it back
    assert set(side) == {"000000", "000001"} and "long_caption" in side["000000"]
    assert tarfile.is_tarfile(tmp_path / "x.tar") and (tmp_path / "o" / "x.jsonl").is_file()
