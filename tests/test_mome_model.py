"""MoME experts, gate and Eq. 1 fusion vs naive sums; run: .venv/bin/python -m pytest -q tests/test_mome_model.py"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import mome.expert
from mome import MoMEConfig, PlainUNet, build_mome

N, K, B, S = 5, 2, 2, 16  # experts, classes, batch, cube edge


def tiny_cfg(**kw) -> MoMEConfig:
    return MoMEConfig(**({"features": (4, 8, 16), "num_classes": K} | kw))


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return build_mome(tiny_cfg(**kw))


def assert_close(a, b, tol=1e-5):
    diff = (a - b).abs()
    assert diff.max() <= tol, f"max diff {diff.max():.3g}, mean diff {diff.mean():.3g}"


def raw_gate_maps(model, x):
    """The gate UNet's own seg heads on cat(image, stage-0 features), computed without HierarchicalGate."""
    shallow = [e.encoder.stages[0](x) for e in model.experts]
    _, maps = model.gate.unet.forward_features(torch.cat([x, *shallow], dim=1), all_levels=True)
    return maps  # L tensors (B, N*K, d, h, w)


def test_expert_layout_and_he_init():
    torch.manual_seed(0)
    net = PlainUNet(in_channels=1, num_classes=K, features=(32, 64, 64), strides=(1, 2, 2))
    convs = [net.encoder.stages[s][0].convs[i].conv for s in range(3) for i in range(2)]
    # downsampling is the strided first conv of each stage > 0
    assert [c.stride for c in convs] == [(1, 1, 1), (1, 1, 1), (2, 2, 2), (1, 1, 1), (2, 2, 2), (1, 1, 1)]
    up = net.decoder.transpconvs[0]
    assert up.kernel_size == up.stride == (2, 2, 2)
    assert len(net.decoder.seg_layers) == 2 and net.decoder.seg_layers[1].in_channels == 32
    norm = net.encoder.stages[1][0].convs[0].norm
    assert norm.affine and norm.eps == 1e-5 and not norm.track_running_stats
    # kaiming_normal_(a=0.01): std = sqrt(2 / (1 + a^2) / fan_in), biases zero
    w = net.encoder.stages[2][0].convs[1].conv.weight  # (64, 64, 3, 3, 3), fan_in 1728
    expected_std = math.sqrt(2.0 / (1 + 1e-4) / (64 * 27))
    assert abs(w.std().item() / expected_std - 1) < 0.03
    assert all((m.bias == 0).all() for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert net(torch.randn(1, 1, 8, 8, 8))[1].shape == (1, K, 4, 4, 4)
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 6, 8, 8))


def test_gate_shapes_and_fusion_equal_naive_sum():
    model = make(features=(4, 8, 16, 16))  # three decoder levels, all fused
    x = torch.randn(B, 1, S, S, S)
    out = model(x, return_all=True)
    assert len(out["fused"]) == len(out["gates"]) == 3
    with torch.no_grad():
        # independent of MoME.forward: each expert called alone, the gate UNet's raw heads
        alone = [expert(x) for expert in model.experts]
        raw = raw_gate_maps(model, x)
    for level, o in enumerate(out["fused"]):
        s = S // 2**level
        assert out["gates"][level].shape == (B, N, K, s, s, s) and o.shape == (B, K, s, s, s)
        naive = torch.zeros_like(o)
        for i in range(N):  # Eq. 1: o^l = sum_i e_i^l * g_i^l; gate channel i*K + k weights expert i, class k
            naive = naive + alone[i][level] * raw[level][:, i * K : (i + 1) * K]
        assert_close(o, naive)
    assert_close(model(x)[2], out["fused"][2])
    # no normalisation by default (official g[:, 2k:2k+2] raw maps)
    assert (out["gates"][0].sum(dim=1) - 1).abs().max() > 0.1


def test_basic_vs_hierarchical_gate():
    x = torch.randn(B, 1, S, S, S)
    hier, basic = make(gate_mode="hierarchical"), make(gate_mode="basic")
    basic.load_state_dict(hier.state_dict())
    with torch.no_grad():
        gh, gb = hier(x, return_all=True)["gates"], basic(x, return_all=True)["gates"]
        raw = raw_gate_maps(hier, x)
    assert_close(gh[0], gb[0])  # both use the finest head at the finest level
    assert_close(gh[1].flatten(1, 2), raw[1])  # hierarchical: the coarse level has its own head
    pooled = F.avg_pool3d(gb[0].flatten(1, 2), kernel_size=2)  # basic: the finest map, 2x2x2-averaged
    assert_close(gb[1].flatten(1, 2), pooled)
    assert (gh[1] - gb[1]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["hierarchical", "basic"])
def test_softmax_gate_sums_to_one(mode):
    out = make(gate_norm="softmax", gate_mode=mode)(torch.randn(B, 1, S, S, S), return_all=True)
    for level, g in enumerate(out["gates"]):
        assert_close(g.sum(dim=1), torch.ones_like(g[:, 0]))
        e = torch.stack([logits[level] for logits in out["experts"]], dim=1)  # (B, N, K, ...)
        # a convex combination of expert logits lies between their min and max
        assert (out["fused"][level] >= e.min(dim=1).values - 1e-5).all()
        assert (out["fused"][level] <= e.max(dim=1).values + 1e-5).all()


@pytest.mark.parametrize("norm", ["none", "softmax"])
def test_uniform_gate_init_starts_from_mean_of_experts(norm):
    model = make(gate_norm=norm)
    model.gate.init_uniform()
    x = torch.randn(B, 1, S, S, S)
    out = model(x, return_all=True)
    for level, fused in enumerate(out["fused"]):
        naive = sum(logits[level] for logits in out["experts"]) / N  # plain mean over the five experts
        assert_close(fused, naive)
    # the heads still learn: their weights get a non-zero gradient from the first step
    out["fused"][0][:, 1].mean().backward()
    assert model.gate.unet.decoder.seg_layers[-1].weight.grad.abs().sum() > 0


def test_shared_gate_maps_mix_expert_margins_and_ignore_logit_offsets():
    model = make(gate_norm="softmax", gate_per_class=False)
    assert model.gate.unet.decoder.seg_layers[-1].out_channels == N  # one map per expert, not N*K
    x = torch.randn(B, 1, S, S, S)
    out = model(x, return_all=True)
    for level, g in enumerate(out["gates"]):
        assert g.shape[1:3] == (N, 1)
        margin = out["fused"][level][:, 1] - out["fused"][level][:, 0]
        naive = sum(g[:, i, 0] * (out["experts"][i][level][:, 1] - out["experts"][i][level][:, 0]) for i in range(N))
        assert_close(margin, naive)
    # adding a constant to every logit of one expert changes neither its softmax nor the fused decision
    with torch.no_grad():
        model.experts[2].decoder.seg_layers[-1].bias += 7.0
    shifted = model(x, return_all=True)["fused"][0]
    assert_close(shifted[:, 1] - shifted[:, 0], out["fused"][0][:, 1] - out["fused"][0][:, 0], tol=1e-4)
    # the per-class gate of the official code does not have this property
    per_class = make(gate_norm="softmax")
    before = per_class(x)[0]
    with torch.no_grad():
        per_class.experts[2].decoder.seg_layers[-1].bias += 7.0
    after = per_class(x)[0]
    assert ((after[:, 1] - after[:, 0]) - (before[:, 1] - before[:, 0])).abs().max() > 1e-2


def test_gradients_reach_gate_and_experts():
    model = make()
    sum(o.square().mean() for o in model(torch.randn(B, 1, S, S, S))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the gate input is not detached: a loss on the gate maps alone trains the experts' stage 0 only
    model.zero_grad(set_to_none=True)
    sum(g.square().mean() for g in model(torch.randn(B, 1, S, S, S), return_all=True)["gates"]).backward()
    expert = model.experts[3]
    assert expert.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert expert.encoder.stages[1][0].convs[0].conv.weight.grad is None
    assert expert.decoder.seg_layers[1].weight.grad is None


def test_activation_checkpointing_is_exact(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(mome.expert, "checkpoint", counting_checkpoint)
    x = torch.randn(B, 1, S, S, S)
    plain, ckpt = make(seed=3), make(seed=3, checkpointing=True)
    outs = [m(x) for m in (plain, ckpt)]
    assert len(calls) == (N + 1) * 5  # every expert and the gate: 3 encoder + 2 decoder stages
    for out in outs:
        sum(o.square().mean() for o in out).backward()
    for a, b in zip(*outs):
        assert_close(a, b, tol=1e-6)
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert_close(p.grad, q.grad, tol=1e-6)


def test_inference_mode_returns_finest_fused_logits():
    train, infer = make(seed=4), make(seed=4, deep_supervision=False)
    x = torch.randn(1, 1, S, S, S)
    with torch.no_grad():
        full, finest = train(x)[0], infer(x)
    assert finest.shape == (1, K, S, S, S)
    assert_close(full, finest)


def test_config_validation_names_bad_value():
    with pytest.raises(ValueError, match="'mean'"):
        tiny_cfg(gate_norm="mean")
    with pytest.raises(ValueError, match="strides"):
        tiny_cfg(strides=(1, 2))
    with pytest.raises(ValueError, match="gate_features"):
        tiny_cfg(gate_features=(4, 8))
    assert tiny_cfg().strides == (1, 2, 2) and tiny_cfg().num_experts == N
