"""OpenCLIP checkpoints in (parity with open_clip itself) and finegrain runs out."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("open_clip")

from finegrain.interop import load_method_spec, split_spec  # noqa: E402
from finegrain.interop.common import read_scale_bias  # noqa: E402

from helpers.interop import TEXTS, close, make_run, open_clip_reference  # noqa: E402


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_checkpoint_matches_open_clip(tmp_path, suffix):
    import open_clip
    from safetensors.torch import save_file

    ref, cfg_file = open_clip_reference(tmp_path)
    weights = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".pt":  # an OpenCLIP training checkpoint: wrapped, DDP prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, weights)
    else:
        save_file(sd, str(weights))
    method, cfg = load_method_spec(f"open_clip:{cfg_file}={weights}")
    assert cfg.method.name == "clip" and cfg.data.image_size == 32
    ids = method.tokenize(TEXTS)
    assert torch.equal(ids, open_clip.get_tokenizer("tiny-oc")(TEXTS))  # tokenizer ids
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert close(method.encode_image(x, normalize=False), ref.encode_image(x))
        assert close(method.encode_text(ids, normalize=False), ref.encode_text(ids))
    assert float(read_scale_bias(method)[0]) == pytest.approx(ref.logit_scale.item())


def test_open_clip_strictness_and_logit_bias(tmp_path):
    ref, cfg_file = open_clip_reference(tmp_path)
    sd = dict(ref.state_dict())
    sd["logit_bias"] = torch.tensor(-7.0)  # a SigLIP-trained CLIP -> the siglip method
    torch.save(sd, tmp_path / "s.pt")
    method, cfg = load_method_spec(f"open_clip:{cfg_file}={tmp_path / 's.pt'}")
    assert cfg.method.name == "siglip" and float(read_scale_bias(method)[1]) == -7.0
    bad = dict(sd)
    bad["visual.proj"] = bad["visual.proj"][:, :8]
    del bad["ln_final.weight"]
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    spec = f"open_clip:{cfg_file}={tmp_path / 'bad.pt'}"
    with pytest.raises(
        ValueError, match=r"1 missing \['text.ln_final.weight'\].*extra.weight.*mis-shaped"
    ):
        load_method_spec(spec)
    with pytest.warns(UserWarning, match="skipped 1 missing"):
        method, _ = load_method_spec(spec, strict=False)
    assert torch.equal(method.text.ln_final.bias, ref.ln_final.bias)  # what fits is loaded


def test_unknown_prefix_and_unsafe_pickle(tmp_path):
    with pytest.raises(ValueError, match="valid prefixes: open_clip:, hf:, flair:"):
        split_spec("openclip:ViT-B-16=x.pt")
    assert split_spec("runs/a:b") == ("", "runs/a:b") and split_spec("C:/w.pt")[0] == ""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load .*needs code execution") as e:
        load_method_spec(f"open_clip:ViT-B-32={tmp_path / 'evil.pt'}")
    assert "weights_only=False" not in str(e.value)


@pytest.mark.parametrize(
    "recipe,overrides",
    [("clip_smoke", []), ("siglip_smoke", []), ("clip_smoke", ["method.image.pool_type=avg"])],
)
def test_export_open_clip_reloads_in_open_clip(tmp_path, recipe, overrides):
    import open_clip

    from finegrain.interop.export import main

    run = make_run(tmp_path / recipe, recipe, overrides)  # avg: OpenCLIP's pool_type='avg'
    out = tmp_path / "oc"
    assert main([str(run), "--format", "open_clip", "--out", str(out)]) == 0
    ours, cfg = load_method_spec(str(run))
    ref = open_clip.create_model(f"local-dir:{out}").eval()
    x = torch.randn(2, 3, 64, 64)
    ids = ours.tokenize(TEXTS)
    with torch.no_grad():
        assert close(ref.encode_image(x), ours.encode_image(x, normalize=False))
        assert close(ref.encode_text(ids), ours.encode_text(ids, normalize=False))
    assert ref.logit_scale.item() == pytest.approx(2.5)
    if recipe == "siglip_smoke":
        assert ref.logit_bias.item() == pytest.approx(-4.0)
    back, _ = load_method_spec(f"open_clip:{out}")  # and finegrain reads the folder again
    with torch.no_grad():
        assert close(back.encode_image(x), ours.encode_image(x))


def test_eval_table_with_a_run_and_an_open_clip_baseline(tmp_path, capsys):
    from finegrain.cli import main

    ref, cfg_file = open_clip_reference(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "oc.pt")
    run = make_run(tmp_path / "run", "clip_smoke")
    out = tmp_path / "report"
    rc = main(["eval", "--checkpoint", str(run), "--checkpoint", f"open_clip:{cfg_file}={tmp_path / 'oc.pt'}",
               "--tasks", "zeroshot:synthetic/shape@num_samples=16@batch_size=16", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "| clip_smoke | open_clip:tiny-oc |" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"clip_smoke", "open_clip:tiny-oc"}
    assert main(["eval", "--checkpoint", "openclip:x=y", "--tasks", "zeroshot:synthetic"]) == 2
    assert "valid prefixes: open_clip:, hf:, flair:" in capsys.readouterr().err


def test_torchscript_archives_give_their_tensors_and_runs_need_a_prefix(tmp_path):
    from finegrain.encoders.weights import load_state_dict_file

    lin = torch.nn.Linear(3, 2)
    torch.jit.script(lin).save(str(tmp_path / "openai.pt"))  # OpenAI's CLIP files are TorchScript
    sd = load_state_dict_file(tmp_path / "openai.pt")
    assert torch.equal(sd["weight"], lin.weight.detach()) and set(sd) == {"weight", "bias"}
    with pytest.raises(ValueError, match="need a spec prefix: open_clip:, hf:, flair:"):
        load_method_spec(str(tmp_path / "openai.pt"))
