"""Checkpoints: atomic save, weights_only load, kind check, exact resume; pytest -q tests/test_shared_checkpoint.py"""

import argparse
import dataclasses
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import checkpoint
from shared.checkpoint import (
    check_same_run,
    load_checkpoint,
    load_foreign_checkpoint,
    load_run_checkpoint,
    plain_args,
    prepare_run_dir,
    restore_run,
    save_checkpoint,
    strip_prefix,
)
from shared.cli import RESUME_MUTABLE_FLAGS
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


def test_foreign_checkpoint_allows_numpy_scalars_and_dtypes_without_trust(tmp_path):
    path = tmp_path / "nnunet.pth"
    torch.save({"network_weights": {"w": torch.ones(2)}, "logging": {"ema": [np.float64(0.5), np.float32(1.5)]},
                "best_acc": np.int64(3), "dtype": np.dtype("float16")}, path)  # fmt: skip
    with pytest.raises(InputError):  # what the numpy allowlist adds to weights_only=True
        load_checkpoint(path)
    ckpt = load_foreign_checkpoint(path, trust_pickle=False, flag="--gate")
    assert torch.equal(ckpt["network_weights"]["w"], torch.ones(2)) and ckpt["dtype"] == np.dtype("float16")
    assert ckpt["logging"]["ema"] == [0.5, 1.5] and type(ckpt["best_acc"]) is np.int64
    assert load_foreign_checkpoint(path, trust_pickle=True, flag="--gate")["best_acc"] == 3


def test_foreign_pickle_needs_trust_pickle(tmp_path):
    payload = {"state_dict": {"w": torch.zeros(3)}, "args": argparse.Namespace(lr=0.1), "best": np.float64(1)}
    zipped, legacy = tmp_path / "official.pth", tmp_path / "legacy.pth"
    torch.save(payload, zipped)
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)  # the globals are named by the error
    for path in (zipped, legacy):
        with pytest.raises(InputError, match=rf"^--input .*{path.name} holds pickled Python objects "
                           r"\(argparse\.Namespace\), which are not loaded because unpickling runs code; pass "
                           r"--trust-pickle if you trust its origin\.$"):  # fmt: skip
            load_foreign_checkpoint(path, trust_pickle=False, flag="--input")
        loaded = load_foreign_checkpoint(path, trust_pickle=True, flag="--input")
        assert loaded["args"] == argparse.Namespace(lr=0.1) and torch.equal(loaded["state_dict"]["w"], torch.zeros(3))
    with pytest.raises(InputError, match=r"runs code; convert it first\.$"):
        load_foreign_checkpoint(zipped, trust_pickle=False, flag="source", remedy="convert it first")


def test_foreign_checkpoint_refusals_name_the_flag_and_file(tmp_path):
    with pytest.raises(InputError, match=r"^--init .*nope\.pt: file not found\.$"):
        load_foreign_checkpoint(tmp_path / "nope.pt", trust_pickle=True, flag="--init")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InputError, match=r"^--init .*empty\.pt: file is empty\.$"):
        load_foreign_checkpoint(tmp_path / "empty.pt", trust_pickle=True, flag="--init")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    for name in ("junk.pt", "truncated.pt"):
        for trust in (False, True):
            with pytest.raises(InputError, match=rf"^--init .*{name}: not a readable checkpoint \(\w+"):
                load_foreign_checkpoint(tmp_path / name, trust_pickle=trust, flag="--init")


def test_foreign_checkpoint_names_a_missing_module(tmp_path, monkeypatch):
    (tmp_path / "gone_module.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module

    torch.save({"thing": gone_module.Thing()}, tmp_path / "thing.pt")
    monkeypatch.delitem(sys.modules, "gone_module")
    (tmp_path / "gone_module.py").unlink()
    with pytest.raises(InputError, match=r"^--model .*thing\.pt: unpickling it needs the Python module 'gone_module'; "
                       r"install it, or save the model's state_dict\(\) where it was trained\.$"):  # fmt: skip
        load_foreign_checkpoint(tmp_path / "thing.pt", trust_pickle=True, flag="--model")


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


# ----------------------------------------------------------------------------- run checkpoints and --resume


def _run_args(**changes) -> argparse.Namespace:
    """The flags of a made-up training call (tuples and Paths, as argparse and CLIs leave them)."""
    flags = dict(modality="T1", lr=0.01, patch=(64, 64, 64), data=["data/Dataset001/"], epochs=10, stop_after=None,
                 workers=2, device="auto", resume=False, compile=None, cache="c", out=Path("runs/a"))  # fmt: skip
    return argparse.Namespace(**{**flags, **changes})


def _save_run(path, args) -> None:
    """A run checkpoint as a training CLI writes it; args=None leaves the flags out (an old checkpoint)."""
    model = _tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    flags = {} if args is None else {"args": plain_args(args)}
    save_checkpoint(path, kind="mome_expert", model=model.state_dict(), optimizer=opt.state_dict(),
                    scaler=make_grad_scaler(torch.device("cpu"), None).state_dict(), rng=rng_state(), epoch=3,
                    **flags)  # fmt: skip


def test_check_same_run_lists_every_differing_flag():
    stored = plain_args(_run_args())
    assert stored["patch"] == [64, 64, 64] and stored["out"] == "runs/a"  # lists and str, as a checkpoint holds them
    check_same_run(stored, _run_args(data=["data/Dataset001"]), path="c.pt")  # same path, other spelling
    changed = _run_args(modality="FLAIR", lr=0.1, patch=(32, 64, 64))
    expected = ("c.pt is a run with other flags, and --resume only continues the same run: --lr: 0.01 -> 0.1, "
                "--modality: T1 -> FLAIR, --patch: 64 64 64 -> 32 64 64 (repeat the first call's values or pick a "
                "new --out).")  # fmt: skip
    with pytest.raises(InputError) as err:
        check_same_run(stored, changed, path="c.pt")
    assert str(err.value) == expected


def test_check_same_run_lets_the_mutable_flags_change_and_the_schedule_grow():
    stored = plain_args(_run_args())
    free = _run_args(stop_after=2, workers=8, device="cuda:1", resume=True, compile=True, cache="elsewhere",
                     out="/moved/runs/a", epochs=20)  # fmt: skip
    check_same_run(stored, free, path="c.pt")
    assert {"--stop-after", "--workers", "--device", "--resume", "--compile", "--cache"} <= set(RESUME_MUTABLE_FLAGS)
    with pytest.raises(InputError, match=r"--epochs: 10 -> 5 \(may only grow\)"):
        check_same_run(stored, _run_args(epochs=5), path="c.pt")
    # a flag the checkpoint does not know (added by a newer version) is not compared
    check_same_run(stored, argparse.Namespace(**vars(_run_args()), new_flag=3), path="c.pt")


def test_check_same_run_refuses_a_checkpoint_without_flags():
    with pytest.raises(InputError, match=r"^c\.pt records no training flags \(args\), so --resume cannot check"):
        check_same_run(None, _run_args(), path="c.pt")


def test_require_run_checkpoint_explains_a_plain_state_dict(tmp_path):
    plain = tmp_path / "weights.pt"
    save_checkpoint(plain, **_tiny_model(0).state_dict())
    hint = "to use its weights, pass --config NAME to name its architecture"
    with pytest.raises(InputError) as err:
        load_run_checkpoint(plain, kind=("sam_med3d", "sam_med3d_moe"), hint=hint)
    assert str(err.value) == (f"{plain} is a plain state_dict (4 tensors, no kind, config or flags), not a sam_med3d "
                              f"or sam_med3d_moe run checkpoint; {hint}.")  # fmt: skip
    other = tmp_path / "other.pt"
    save_checkpoint(other, kind="mome", model={})
    with pytest.raises(InputError, match=r"other\.pt is a mome checkpoint, expected moe_missing\.$"):
        load_run_checkpoint(other, kind="moe_missing")
    with pytest.raises(InputError, match=r"other\.pt: this mome checkpoint lacks \['config'\]"):
        load_run_checkpoint(other, kind="mome", keys=("model", "config"))
    assert load_run_checkpoint(other, kind="mome")["kind"] == "mome"
    foreign = tmp_path / "foreign.pt"
    save_checkpoint(foreign, network_weights={"w": torch.ones(1)}, trainer_name="nnUNetTrainer")
    no_kind = r"records no kind \(keys: network_weights, trainer_name\), not a mome run checkpoint; pass a checkpoint"
    with pytest.raises(InputError, match=no_kind + r"\.pt written by its training CLI\.$"):
        load_run_checkpoint(foreign, kind="mome")


def test_prepare_run_dir_fresh_start_and_refusals(tmp_path):
    out = tmp_path / "run"
    assert prepare_run_dir(out, resume=False, args=_run_args(), kind="mome_expert") is None
    assert prepare_run_dir(out, resume=True, args=_run_args(), kind="mome_expert") is None  # nothing to resume yet
    assert not out.exists()  # checked, not created
    _save_run(out / "checkpoint.pt", _run_args())
    with pytest.raises(InputError, match=r"^--out .*run already holds checkpoint\.pt; pass --resume"):
        prepare_run_dir(out, resume=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"^--out .*file is a file, expected a folder\.$"):
        prepare_run_dir(tmp_path / "file", resume=True)


def test_prepare_run_dir_resumes_only_the_same_run(tmp_path):
    out = tmp_path / "run"
    _save_run(out / "checkpoint.pt", _run_args())
    ckpt = prepare_run_dir(out, resume=True, args=_run_args(resume=True, stop_after=1), kind="mome_expert")
    assert ckpt["epoch"] == 3 and ckpt["args"]["modality"] == "T1"
    with pytest.raises(InputError, match=r"--modality: T1 -> FLAIR"):
        prepare_run_dir(out, resume=True, args=_run_args(modality="FLAIR"), kind="mome_expert")
    with pytest.raises(InputError, match=r"is a mome_expert checkpoint, expected mome\.$"):
        prepare_run_dir(out, resume=True, kind="mome")
    _save_run(out / "checkpoint.pt", None)
    with pytest.raises(InputError, match="records no training flags"):
        prepare_run_dir(out, resume=True, args=_run_args(), kind="mome_expert")


def test_prepare_run_dir_removes_stale_temps_on_rank_0_only(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "repeat_0").mkdir(parents=True)
    stale = [out / ".tmp_checkpoint.pt.k3j9x0_a.pt", out / "repeat_0" / ".tmp_log.csv.abcdefgh.csv"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    prepare_run_dir(out, resume=True, is_main=False)
    assert all(p.exists() for p in stale)
    prepare_run_dir(out, resume=True)
    assert not any(p.exists() for p in stale) and sorted(os.listdir(out)) == ["repeat_0"]
    assert "removed 2 temp file(s)" in capsys.readouterr().out


def test_restore_run_takes_the_prepared_dict_and_checks_the_run(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save_run(path, _run_args())
    model, opt = _tiny_model(1), torch.optim.SGD(_tiny_model(1).parameters(), lr=0.1)
    scaler = make_grad_scaler(torch.device("cpu"), None)
    ckpt = load_checkpoint(path)
    restored = restore_run(ckpt, kind="mome_expert", model=model, optimizer=opt, scaler=scaler, generator=None,
                           device="cpu", args=_run_args())  # fmt: skip
    assert restored["epoch"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _tiny_model(0).state_dict().values()))
    with pytest.raises(InputError, match=r"--lr: 0\.01 -> 0\.5"):
        restore_run(path, kind="mome_expert", model=model, optimizer=opt, scaler=scaler, generator=None,
                    device="cpu", args=_run_args(lr=0.5))  # fmt: skip
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, **_tiny_model(0).state_dict())
    with pytest.raises(InputError, match="plain state_dict"):
        restore_run(plain, kind="mome_expert", model=model, optimizer=opt, scaler=scaler, generator=None, device="cpu")
