"""Harness: device, AMP, compile, seeding, metrics log, lr schedules; pytest -q tests/test_shared_harness.py"""

import csv
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from shared import harness
from shared.errors import InputError
from shared.harness import (
    DistInfo,
    MetricsLogger,
    all_reduce_mean,
    autocast_context,
    check_finite_loss,
    cosine_lr,
    init_distributed,
    make_grad_scaler,
    maybe_compile,
    pick_amp_dtype,
    pick_device,
    poly_lr,
    seed_everything,
    warmup_cosine_lr,
    wrap_ddp,
)

CPU = torch.device("cpu")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(harness, "_DEVICE_PRINTED", False)


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_pick_device_cpu_prints_once_on_rank0(no_torchrun_env, capsys):
    assert pick_device() == CPU
    assert pick_device("cpu") == CPU
    assert capsys.readouterr().out == "device: cpu\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_pick_device_silent_on_other_ranks(no_torchrun_env, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert pick_device() == CPU
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_rejects_cuda_without_gpu(no_torchrun_env):
    with pytest.raises(InputError, match="'cuda' was requested but CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(InputError, match="'tpu' is not one of"):
        pick_device("tpu")


# ----------------------------------------------------------------------------- AMP


def test_amp_dtype_choice(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_amp_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_amp_dtype(cuda) == torch.float16  # e.g. V100 / T4
    assert pick_amp_dtype(cuda, enabled=False) is None
    assert pick_amp_dtype(CPU) is None
    assert pick_amp_dtype(CPU, cpu_bf16=True) == torch.bfloat16
    assert pick_amp_dtype(CPU, enabled=False, cpu_bf16=True) is None


def test_autocast_cpu_bf16_matmul_and_default_noop():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    expected = torch.tensor([[4.5, -0.5], [9.5, -2.0]])  # by hand; exact in bf16 too
    with autocast_context(CPU, cpu_bf16=True):
        out = a @ b
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), expected)
    with autocast_context(CPU):
        out = a @ b
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_grad_scaler_disabled_on_cpu_is_pass_through():
    for dtype in (None, torch.bfloat16, torch.float16):
        assert not make_grad_scaler(CPU, dtype).is_enabled()
    # bf16 on CUDA needs no scaling either (fp32 exponent range)
    assert not make_grad_scaler(torch.device("cuda", 0), torch.bfloat16).is_enabled()

    # one loop step in STYLE.md order under bf16 autocast must equal plain SGD: w <- w - lr * dL/dw
    w0 = torch.tensor([[1.0, -2.0]])
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = make_grad_scaler(CPU, torch.bfloat16)
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    with autocast_context(CPU, cpu_bf16=True):
        loss = model(x).float().sum()  # outputs -1 and 2 -> loss 1
    assert scaler.scale(loss) is loss
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=100.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    # dL/dw = sum of rows of x = [3, 1]; params stay float32 under autocast
    assert model.weight.dtype == torch.float32
    assert torch.equal(model.weight.detach(), w0 - 0.5 * torch.tensor([[3.0, 1.0]]))
    assert model.weight.grad is None


# ----------------------------------------------------------------------------- compile, DDP (single process)


def test_maybe_compile_returns_plain_module_to_save():
    model = torch.nn.Linear(3, 2)
    fwd, save = maybe_compile(model, enabled=False)
    assert fwd is model and save is model
    fwd, save = maybe_compile(model, enabled=True)  # compilation itself is lazy: nothing runs here
    assert fwd is not model and save is model
    assert sorted(save.state_dict()) == ["bias", "weight"]
    assert any(k.startswith("_orig_mod.") for k in fwd.state_dict())  # why the plain module is kept


def test_single_process_distributed_is_a_no_op(no_torchrun_env):
    info = init_distributed()
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, is_main=True, device=info.device)
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model
    assert all_reduce_mean(2.5) == 2.5
    t = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(t) is t


# ----------------------------------------------------------------------------- seeding


def test_seed_everything_repeats_per_rank_and_differs_across_ranks():
    def draws(seed, rank):
        rng = seed_everything(seed, rank=rank)
        return (random.random(), float(np.random.rand()), float(torch.rand(1)), float(rng.random()))

    first, again, other_rank = draws(7, 0), draws(7, 0), draws(7, 1)
    assert first == again
    assert all(a != b for a, b in zip(first, other_rank))
    # rank r of seed s is the same stream as rank 0 of seed s + r
    assert other_rank == draws(8, 0)
    assert draws(7, 0)[3] == np.random.default_rng(7).random()


# ----------------------------------------------------------------------------- metrics log and NaN guard


def test_metrics_logger_csv_widens_header_and_appends_on_resume(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    log = MetricsLogger(path, is_main=True)
    log.log(step=0, loss=torch.tensor(1.5), lr=0.01)
    log.log(step=1, loss=np.float32(1.25), lr=0.009)
    log.log(step=2, loss=1.0, lr=0.008, dice=0.5)  # a validation metric appears later
    MetricsLogger(path, is_main=True).log(step=3, loss=0.75, lr=0.007)  # resumed run
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines == [
        ["step", "loss", "lr", "dice"],
        ["0", "1.5", "0.01", ""],
        ["1", "1.25", "0.009", ""],
        ["2", "1.0", "0.008", "0.5"],
        ["3", "0.75", "0.007", ""],
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_metrics_logger_resume_drops_rows_after_the_checkpoint(tmp_path, suffix):
    path = tmp_path / f"log{suffix}"
    first = MetricsLogger(path, start_step=0)
    for step in (25, 50, 75):  # checkpoint saved at 50, run killed after logging 75
        first.log(step=step, loss=step / 100)
    MetricsLogger(path, start_step=50).log(step=75, loss=0.7)  # the resumed run repeats step 75
    if suffix == ".csv":
        with open(path, newline="") as f:
            steps = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    else:
        steps = [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]
    assert steps == [(25, 0.25), (50, 0.5), (75, 0.7)]
    MetricsLogger(path, start_step=0)  # a fresh run in the same folder starts an empty log
    assert path.read_text().count("\n") == (1 if suffix == ".csv" else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_metrics_logger_jsonl_and_non_main_rank(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsLogger(path).log(step=0, loss=torch.tensor(0.5))
    MetricsLogger(path).log(step=10, loss=0.25, dice=0.75)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 0, "loss": 0.5}, {"step": 10, "loss": 0.25, "dice": 0.75}]

    silent = tmp_path / "rank1.csv"
    MetricsLogger(silent, is_main=False).log(step=0, loss=1.0)
    assert not silent.exists()
    with pytest.raises(InputError, match="must end in .csv or .jsonl"):
        MetricsLogger(tmp_path / "metrics.txt")


def test_check_finite_loss_messages(tmp_path):
    check_finite_loss(torch.tensor(0.3), step=5)
    ckpt = tmp_path / "checkpoint.pt"
    # NaN before the first save: the checkpoint path is known but nothing was written there
    never_written = rf"^loss is NaN at step 7; no checkpoint written yet \({re.escape(str(ckpt))} does not exist\)\.$"
    with pytest.raises(FloatingPointError, match=never_written):
        check_finite_loss(torch.tensor(float("nan")), step=7, checkpoint_path=ckpt)
    ckpt.write_bytes(b"a good checkpoint")
    kept = rf"^loss is NaN at step 9; last good checkpoint kept at {re.escape(str(ckpt))}\.$"
    with pytest.raises(FloatingPointError, match=kept):
        check_finite_loss(torch.tensor(float("nan")), step=9, checkpoint_path=ckpt)
    with pytest.raises(FloatingPointError, match=r"^loss is Inf at step 0; no checkpoint written yet\.$"):
        check_finite_loss(float("-inf"), step=0)


# ----------------------------------------------------------------------------- lr schedules (values by hand)


def test_cosine_lr_hand_values():
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(25, 100, 1.0) == pytest.approx(0.8535533905932737)  # (1 + cos(pi/4)) / 2
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(150, 100, 0.1, min_lr=0.01) == pytest.approx(0.01)  # held after the end
    assert cosine_lr(50, 100, 0.1, min_lr=0.02) == pytest.approx(0.06)


def test_poly_lr_hand_values():
    assert poly_lr(0, 1000, 0.01) == pytest.approx(0.01)
    assert poly_lr(500, 1000, 0.01) == pytest.approx(0.01 * 0.5358867312681466)  # 0.5 ** 0.9
    assert poly_lr(750, 1000, 1.0, exponent=2.0) == pytest.approx(0.0625)
    assert poly_lr(1000, 1000, 0.01) == 0.0
    assert poly_lr(1200, 1000, 0.01) == 0.0


def test_warmup_cosine_lr_hand_values():
    assert warmup_cosine_lr(0, 110, 1.0, warmup=10) == pytest.approx(0.1)
    assert warmup_cosine_lr(4, 110, 1.0, warmup=10) == pytest.approx(0.5)
    assert warmup_cosine_lr(9, 110, 1.0, warmup=10) == pytest.approx(1.0)
    assert warmup_cosine_lr(10, 110, 1.0, warmup=10) == pytest.approx(1.0)
    assert warmup_cosine_lr(60, 110, 1.0, warmup=10) == pytest.approx(0.5)
    assert warmup_cosine_lr(110, 110, 1.0, warmup=10) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine_lr(3, 10, 2.0, warmup=0) == pytest.approx(1.0 + math.cos(0.3 * math.pi))
    with pytest.raises(InputError, match="warmup=20 with total=10"):
        warmup_cosine_lr(0, 10, 1.0, warmup=20)
    with pytest.raises(InputError, match="total=0"):
        poly_lr(0, 0, 1.0)
