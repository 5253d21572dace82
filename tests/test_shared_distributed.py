"""2-rank gloo DDP under torchrun syncs with mean grads; run: pytest -q tests/test_shared_distributed.py"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
LR = 0.1

# Each rank: seed with its rank, wrap a Linear in DDP, take 2 SGD steps on its own random batch, then
# gather what it saw; rank 0 writes everything to result.json for the test to check independently.
WORKER = textwrap.dedent(
    f"""
    import json, sys
    import torch
    import torch.distributed as dist
    from shared.cli import run_cli
    from shared.harness import all_reduce_mean, init_distributed, seed_everything, wrap_ddp

    def main():
        info = init_distributed()
        rng = seed_everything(0, rank=info.rank)
        first_draw = float(rng.random())
        model = torch.nn.Linear(4, 2)  # initialised differently per rank (different torch seeds)
        own_init = [p.detach().clone().tolist() for p in model.parameters()]
        ddp = wrap_ddp(model, info)
        synced_init = [p.detach().clone().tolist() for p in model.parameters()]
        opt = torch.optim.SGD(ddp.parameters(), lr={LR})
        batches, losses = [], []
        for step in range(2):
            x = torch.from_numpy(rng.standard_normal((3, 4))).float()
            loss = ddp(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            batches.append(x.tolist())
            losses.append(loss.item())
        mean_last_loss = all_reduce_mean(losses[-1])
        mine = dict(rank=info.rank, world_size=info.world_size, is_main=info.is_main, first_draw=first_draw,
                    own_init=own_init, synced_init=synced_init, batches=batches, losses=losses,
                    final=[p.detach().tolist() for p in model.parameters()], mean_last_loss=mean_last_loss)
        everyone = [None] * info.world_size
        dist.all_gather_object(everyone, mine)
        if info.is_main:
            with open(sys.argv[1], "w") as f:
                json.dump(everyone, f)

    run_cli(main)  # leaves the process group after main() returns, as the training scripts do
    assert not dist.is_initialized()
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_ddp(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]
    cmd += ["--master_addr=127.0.0.1", "--master_port", str(_free_port()), str(script), str(result)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    ranks = json.loads(result.read_text())

    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["is_main"] for r in ranks] == [True, False]
    # every rank drew its own data and started from its own init, until DDP broadcast rank 0's weights
    assert ranks[0]["first_draw"] != ranks[1]["first_draw"]
    assert ranks[0]["batches"][0] != ranks[1]["batches"][0]
    assert ranks[0]["own_init"] != ranks[1]["own_init"]
    assert ranks[0]["synced_init"] == ranks[1]["synced_init"] == ranks[0]["own_init"]
    assert ranks[0]["final"] == ranks[1]["final"]  # identical after the steps

    # independent single-process replay: SGD on the mean of the two ranks' gradients
    weight, bias = (torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in ranks[0]["synced_init"])
    for step in range(2):
        grads = []
        for r in ranks:
            x = torch.tensor(r["batches"][step])
            loss = (x @ weight.T + bias).square().mean()
            grads.append(torch.autograd.grad(loss, [weight, bias]))
            assert loss.item() == pytest.approx(r["losses"][step], rel=1e-6)
        with torch.no_grad():
            weight -= LR * (grads[0][0] + grads[1][0]) / 2
            bias -= LR * (grads[0][1] + grads[1][1]) / 2
    torch.testing.assert_close(weight, torch.tensor(ranks[0]["final"][0]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, torch.tensor(ranks[0]["final"][1]), rtol=1e-6, atol=1e-7)

    mean_loss = (ranks[0]["losses"][-1] + ranks[1]["losses"][-1]) / 2
    assert ranks[0]["mean_last_loss"] == ranks[1]["mean_last_loss"]
    assert abs(ranks[0]["mean_last_loss"] - mean_loss) < 1e-12
