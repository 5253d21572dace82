"""Checkpoints: atomic save, weights_only load, kind check, exact resume; pytest -q tests/test_shared_checkpoint.py"""

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from shared import checkpoint
from shared.checkpoint import load_checkpoint, save_checkpoint, strip_prefix
from shared.errors import InputError
from shared.harness import gather_rng_state, make_grad_scaler, rng_state, seed_everything, set_rng_state


@dataclasses.dataclass
class TinyConfig:
    width: int = 4  # hidden units
    name: str = "tiny"
    dropout: float | None = None


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _train_steps(model, opt, n_steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        x = torch.randn(5, 3, generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_round_trip_resumes_model_and_adamw_exactly(tmp_path):
    model = _tiny_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_steps(model, opt, n_steps=3, seed=1)
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(
        path,
        kind="tiny",
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        scaler=make_grad_scaler(torch.device("cpu"), None).state_dict(),
        step=3,
        config=dataclasses.asdict(TinyConfig()),
        rng=gather_rng_state(np.random.default_rng(0)),
    )
    # the file is readable by a bare weights_only load, with no help from this project
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["step"] == 3 and raw["kind"] == "tiny"
    assert TinyConfig(**raw["config"]) == TinyConfig()

    payload = load_checkpoint(path, map_location="cpu", expect_kind="tiny")
    resumed = _tiny_model(123)  # different init: everything must come from the file
    resumed.load_state_dict(payload["model"], strict=True)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1.0)
    resumed_opt.load_state_dict(payload["optimizer"])
    assert resumed_opt.param_groups[0]["lr"] == 1e-2

    # two more steps on both must agree bit for bit: exp_avg, exp_avg_sq and the step count survived
    _train_steps(model, opt, n_steps=2, seed=2)
    _train_steps(resumed, resumed_opt, n_steps=2, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_rng_state_resume_is_exact(tmp_path):
    gen = seed_everything(11)
    # leave cached Gaussians behind: python's gauss_next and numpy's has_gauss are part of the state
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    gen.standard_normal(3)
    save_checkpoint(tmp_path / "rng.pt", rng=rng_state(gen))

    def draw(g):
        return (
            [random.random(), random.gauss(0.0, 1.0)],
            np.random.standard_normal(3).tolist() + np.random.rand(2).tolist(),
            g.standard_normal(3).tolist() + g.integers(0, 1 << 62, size=2).tolist(),
            torch.randn(4).tolist(),
        )

    expected = draw(gen)
    draw(gen)  # move every stream further on
    fresh_gen = np.random.default_rng(999)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], generator=fresh_gen)
    assert draw(fresh_gen) == expected


def test_rng_state_list_from_other_world_size_is_not_applied(capsys):
    seed_everything(1)
    states = [rng_state(), rng_state()]  # as if saved by a 2-rank run
    seed_everything(2)
    before = torch.get_rng_state()
    set_rng_state(states)
    assert torch.equal(torch.get_rng_state(), before)
    assert "state is for 2 ranks, this run has 1" in capsys.readouterr().out


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, step=1, weight=torch.arange(6.0))
    before = path.read_bytes()

    real_save = torch.save

    def save_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the temp file now holds a full write ...
        f.write(b"garbage")
        raise OSError("disk full")  # ... but it must never replace the good checkpoint

    monkeypatch.setattr(checkpoint.torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, step=2, weight=torch.zeros(6))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_non_plain_payload_is_refused_before_writing(tmp_path):
    path = tmp_path / "bad.pt"
    with pytest.raises(TypeError, match=r"config\['cfg'\] is a TinyConfig"):
        save_checkpoint(path, config={"cfg": TinyConfig()})
    with pytest.raises(TypeError, match=r"rng\[0\] is a ndarray"):
        save_checkpoint(path, rng=[np.zeros(3)])
    assert os.listdir(tmp_path) == []


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(InputError, match=f"^{missing}: checkpoint file not found"):
        load_checkpoint(missing)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.pt: checkpoint file is empty"):
        load_checkpoint(empty)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file at all")
    with pytest.raises(InputError, match="corrupt.pt: not a readable checkpoint"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, w=torch.ones(1000))
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(InputError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    not_dict = tmp_path / "list.pt"
    torch.save([1, 2], not_dict)
    with pytest.raises(InputError, match="list.pt: checkpoint holds a list, expected a dict"):
        load_checkpoint(not_dict)


def test_foreign_pickle_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"config": TinyConfig()}, path)  # arbitrary objects need unpickling code: refused
    with pytest.raises(InputError, match="pickled.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_kind_mismatch_message(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, kind="mome", step=0)
    with pytest.raises(InputError, match=f"^{path} is a mome checkpoint, expected moe_missing\\.$"):
        load_checkpoint(path, expect_kind="moe_missing")
    assert load_checkpoint(path, expect_kind="mome")["step"] == 0
    save_checkpoint(tmp_path / "b.pt", step=0)  # no kind recorded (e.g. exported weights): accepted
    assert load_checkpoint(tmp_path / "b.pt", expect_kind="mome") == {"step": 0}


def test_strip_prefix():
    sd = {"module.conv.weight": 1, "module.conv.bias": 2, "head.weight": 3, "xmodule.a": 4}
    assert strip_prefix(sd) == {"conv.weight": 1, "conv.bias": 2, "head.weight": 3, "xmodule.a": 4}
    assert list(strip_prefix(sd)) == ["conv.weight", "conv.bias", "head.weight", "xmodule.a"]
    assert strip_prefix({"_orig_mod.w": 5}, prefix="_orig_mod.") == {"w": 5}
