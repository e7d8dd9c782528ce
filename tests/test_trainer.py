import json

import pytest
import torch

from finegrain.checkpoint import latest_checkpoint
from finegrain.train.checkpoint import load_state
from finegrain.train.step import exact_accumulation
from finegrain.train.trainer import NonFiniteLossError, Trainer

from helpers.numerics import assert_close_scaled
from helpers.toy_method import ToyCLIP, ToyConfig, ToyLoader, toy_run_config, toy_trainer


class CrashingLoader(ToyLoader):
    def __init__(self, after: int) -> None:
        super().__init__(batch_size=8)
        self.after = after

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            if i == self.after:
                raise RuntimeError("simulated crash")
            yield b


def _grads(method):
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _batch(n=16, dtype=torch.float32):
    loader = ToyLoader(n=64, batch_size=n)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in next(iter(loader)).items()}


def test_exact_accumulation_equals_big_batch_gradient():
    """float64 (exactness on any machine's kernels; see helpers.numerics)."""
    torch.manual_seed(0)
    method = ToyCLIP(ToyConfig()).double()
    big = _batch(16, torch.float64)
    method.zero_grad()
    method(big).loss.backward()
    ref = _grads(method)
    method.zero_grad()
    micro = [{k: v[i : i + 4] for k, v in big.items()} for i in range(0, 16, 4)]
    out, ok = exact_accumulation(micro, method.features, method.loss_from_features)
    assert ok
    got = _grads(method)
    assert set(got) == set(ref)
    for n in ref:  # logit_scale included: counted once, not once per micro-batch
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(out.loss, method(big).loss)


def test_naive_per_microbatch_accumulation_differs():
    """Guard that the test above can fail: summing micro-batch losses is not the big batch."""
    method = ToyCLIP(ToyConfig())
    big = _batch(16)
    method(big).loss.backward()
    ref = _grads(method)
    method.zero_grad()
    for i in range(0, 16, 4):
        (method({k: v[i : i + 4] for k, v in big.items()}).loss / 4).backward()
    assert not torch.allclose(_grads(method)["image_proj.0.weight"], ref["image_proj.0.weight"])


def test_accumulation_reuses_dropout_masks():
    torch.manual_seed(1)
    method = ToyCLIP(ToyConfig(dropout=0.5)).double()
    big = _batch(8, torch.float64)
    micro = [{k: v[i : i + 4] for k, v in big.items()} for i in (0, 4)]
    state = torch.get_rng_state()
    exact_accumulation(micro, method.features, method.loss_from_features)
    got = _grads(method)
    # reference: same masks, i.e. cached features of each micro-batch from the same RNG state
    method.zero_grad()
    torch.set_rng_state(state)
    feats = [method.features(mb) for mb in micro]
    full = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
    method.loss_from_features(full).loss.backward()
    for n, g in _grads(method).items():
        torch.testing.assert_close(got[n], g, rtol=1e-10, atol=1e-12, msg=n)


def test_trainer_accum_matches_large_batch(tmp_path):
    """3 steps of 2 x 4 accumulated samples == 3 steps of batches of 8 (no dropout)."""
    b_cfg = toy_run_config(tmp_path / "b", 3, accum_steps=2)
    b_cfg.data.batch_size, b_cfg.method.dropout = 4, 0.0
    b = Trainer(b_cfg, loader=ToyLoader(batch_size=4, seed=0, n=32))
    a_cfg = toy_run_config(tmp_path / "a", 3)
    a_cfg.method.dropout = 0.0
    a = Trainer(a_cfg, loader=ToyLoader(batch_size=8, seed=0, n=32))
    a.fit()
    b.fit()
    # float32 through AdamW (which amplifies rounding of near-zero gradients): the absolute
    # slack follows each tensor's magnitude (helpers.numerics)
    for (n, p), q in zip(a.method.state_dict().items(), b.method.state_dict().values()):
        assert_close_scaled(q, p, rtol=1e-4, atol_rel=1e-4, atol=1e-5, msg=n)


def test_training_lowers_loss_and_writes_logs(tmp_path):
    tr = toy_trainer(tmp_path, steps=40)
    batch = _batch(32)
    tr.method.eval()  # no dropout when measuring
    before = tr.method(batch).loss.item()
    tr.method.train()
    summary = tr.fit()
    tr.method.eval()
    after = tr.method(batch).loss.item()
    assert after < 0.7 * before, (before, after)
    assert summary["status"] == "completed" and summary["step"] == 40
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["data"]["seen"] == 40 * 8 and on_disk["skipped_steps"] == 0
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert latest_checkpoint(tmp_path).name == "step_0000040"


def test_tensorboard_scalars_by_name(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toy_trainer(tmp_path, steps=4).fit()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/contrastive_loss",
        "train/lr",
        "train/logit_scale",
        "rank0/samples_per_s",
        "rank0/data_wait_s",
        "train/data_broken",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"


def test_resume_is_bitwise_exact_in_process(tmp_path):
    full = toy_trainer(tmp_path / "full", steps=8, checkpoint_every=4)
    full.fit()
    ref = full.method.state_dict()
    first = toy_trainer(tmp_path / "part", steps=8, checkpoint_every=4)
    first.loader = CrashingLoader(after=6)  # dies fetching step 7's batch
    with pytest.raises(RuntimeError, match="crash"):
        first.fit()
    assert latest_checkpoint(tmp_path / "part").name == "step_0000004"
    second = toy_trainer(tmp_path / "part", steps=8, checkpoint_every=4, resume="latest")
    assert second.step == 4
    second.fit()
    for k, v in ref.items():
        assert torch.equal(v, second.method.state_dict()[k]), k


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    summary = toy_trainer(tmp_path, steps=3, precision=precision, grad_clip=1.0).fit()
    assert summary["status"] == "completed"
    _, state = load_state(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and "scaler" in state


def test_grad_clip_bounds_the_norm(tmp_path):
    tr = toy_trainer(tmp_path, steps=1, grad_clip=1e-3)
    batch = next(iter(tr.loader))
    tr.train_step([batch])
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.params]))
    assert norm <= 1e-3 * (1 + 1e-4)


def test_nan_stop_names_step_and_terms_and_leaves_no_partial_checkpoint(tmp_path):
    cfg = toy_run_config(tmp_path, 6, checkpoint_every=2)
    cfg.method.nan_after = 3
    tr = Trainer(cfg, loader=ToyLoader())
    with pytest.raises(NonFiniteLossError, match=r"step 4: loss=nan, contrastive_loss=nan"):
        tr.fit()
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["latest", "step_0000002"], names
    assert json.loads((tmp_path / "summary.json").read_text())["status"].startswith("stopped")


def test_nan_skip_counts_and_leaves_weights(tmp_path):
    cfg = toy_run_config(tmp_path, 5, checkpoint_every=3, nan_policy="skip", keep_last=0)
    cfg.method.nan_after = 3
    summary = Trainer(cfg, loader=ToyLoader()).fit()
    assert summary["skipped_steps"] == 2 and summary["step"] == 5
    w3, _ = load_state(tmp_path / "ckpt" / "step_0000003")
    w5, _ = load_state(tmp_path / "ckpt" / "step_0000005")
    assert torch.equal(w3["image_proj.0.weight"], w5["image_proj.0.weight"])


def test_bad_trainer_config_is_clear(tmp_path):
    with pytest.raises(ValueError, match="precision 'fp8'.*valid choices: fp32, bf16, fp16"):
        toy_trainer(tmp_path, precision="fp8")
    with pytest.raises(ValueError, match="train.nan_policy"):
        toy_trainer(tmp_path, nan_policy="ignore")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        toy_trainer(blocker / "run")


def test_incompatible_resume_is_one_line(tmp_path):
    toy_trainer(tmp_path, steps=2).fit()
    cfg = toy_run_config(tmp_path, 4)
    cfg.method.hidden = 32
    with pytest.raises(ValueError, match=r"incompatible checkpoint .*method.hidden \(16 vs 32\)"):
        Trainer(cfg, loader=ToyLoader(), resume="latest")


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path):
    """train.compile=true (inductor on CPU) takes the same steps as eager, to float tolerance."""
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = toy_run_config(tmp_path / name, 3, compile=compile_)
        cfg.method.dropout = 0.0  # inductor draws dropout masks from its own RNG stream
        runs[name] = Trainer(cfg, loader=ToyLoader())
    eager, compiled = runs["eager"], runs["compiled"]
    assert compiled.model is not compiled.method, "the model must be wrapped by torch.compile"
    eager.fit()
    compiled.fit()
    for k, v in eager.method.state_dict().items():
        assert_close_scaled(
            compiled.method.state_dict()[k], v, rtol=1e-4, atol_rel=1e-4, atol=1e-5, msg=k
        )
