"""SAM-Med3D-MoE by hand: mask selector (Sec. 2.3) and Table 2 variants, gate (Sec. 2.2), losses, click simulation.

Run: pytest tests/test_sam_med3d_moe_moe.py
"""

import math

import numpy as np
import pytest
import torch

from sam_med3d_moe.clicks import box_from_mask, random_click, ritm_click
from sam_med3d_moe.config import GateConfig, small_config
from sam_med3d_moe.gate import GatingNetwork
from sam_med3d_moe.interaction import evaluate_points, train_interaction
from sam_med3d_moe.losses import dice_ce_loss, gate_loss
from sam_med3d_moe.model import build_model
from sam_med3d_moe.moe import SamMed3DMoE, expert_from
from sam_med3d_moe.selector import aft_weight_selector, average_selector, mask_selector, select, top_expert

MG = torch.tensor([[1.0, -2.0], [0.5, 4.0]])  # two samples of general logits
MT = torch.tensor([[3.0, 2.0], [-1.0, 0.0]])  # top-expert logits


def test_mask_selector_by_hand():
    s = torch.tensor([0.8, 0.3])
    out = mask_selector(MG, MT, s, tau=0.5)
    assert torch.allclose(out[0], torch.tensor([0.2 * 1 + 0.8 * 3, 0.2 * -2 + 0.8 * 2]))
    assert torch.equal(out[1], MG[1])  # s_top <= tau: general only
    assert torch.equal(mask_selector(MG, MT, torch.tensor([0.5, 0.5]), tau=0.5), MG)  # strict ">"
    assert torch.equal(mask_selector(MG, MT, s, tau=0.85), MG)  # tau 0.85 switches the expert off


def test_table2_variants_by_hand():
    s = torch.tensor([0.8, 0.3])
    avg = average_selector(MG, MT, s, tau=0.5)
    assert torch.allclose(avg[0], torch.tensor([2.0, 0.0])) and torch.equal(avg[1], MG[1])
    s_g = torch.tensor([0.1, 0.6])
    aft = aft_weight_selector(MG, MT, s, s_g, tau=0.5)
    w = math.exp(0.8) / (math.exp(0.1) + math.exp(0.8))
    assert torch.allclose(aft[0], (1 - w) * MG[0] + w * MT[0]) and torch.equal(aft[1], MG[1])


def test_select_uses_the_best_specific_expert_not_the_general_column():
    scores = torch.tensor([[0.5, 0.1, 0.4], [0.05, 0.9, 0.05]])
    s_top, index = top_expert(scores)
    assert torch.allclose(s_top, torch.tensor([0.4, 0.9])) and index.tolist() == [1, 0]
    out = select(MG, MT, scores, mode="weighted", tau=0.5)
    assert torch.equal(out[0], MG[0]) and torch.allclose(out[1], 0.1 * MG[1] + 0.9 * MT[1])
    top1 = select(MG, MT, scores, mode="top1", tau=0.5)
    assert torch.equal(top1[1], MT[1]) and torch.equal(top1[0], MG[0])  # s_top 0.4 <= tau: the general expert
    assert torch.equal(select(MG, MT, scores, mode="general"), MG)


def test_losses_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0]).reshape(1, 1, 2, 2, 1)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2, 1)
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1))]
    dice = 1 - (2 * (p[0] + p[1]) + 1e-5) / (sum(x * x for x in p) + 2 + 1e-5)
    bce = -(math.log(p[0]) + math.log(p[1]) + math.log(1 - p[2]) + math.log(1 - p[3])) / 4
    assert dice_ce_loss(logits, target, ce=False).item() == pytest.approx(dice, rel=1e-6)
    assert dice_ce_loss(logits, target).item() == pytest.approx(dice + bce, rel=1e-6)
    gate_logits, task = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    want = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    assert gate_loss(gate_logits, task).item() == pytest.approx(want, rel=1e-6)


def test_dice_ce_equals_monai():
    monai = pytest.importorskip("monai")
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 5, 4, 3), (torch.rand(2, 1, 5, 4, 3) > 0.5).float()
    ref = monai.losses.DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")(logits, target)
    assert dice_ce_loss(logits, target).item() == pytest.approx(ref.item(), rel=1e-5)


def _gt(size=12, lo=3, hi=10):
    gt = torch.zeros(1, 1, size, size, size)
    gt[..., lo:hi, lo:hi, lo:hi] = 1
    return gt


def test_random_click_draws_from_the_error_region_with_the_logit_cut_off():
    rng = np.random.default_rng(0)
    gt = _gt()
    coords, labels = random_click(torch.zeros_like(gt), gt, rng)  # first click: a foreground voxel, positive
    assert gt[0, 0][tuple(coords[0, 0])] == 1 and labels.item() == 1
    logits = torch.where(gt > 0, 5.0, -5.0)
    logits[0, 0, 0, 0, 0] = 0.7  # one false positive (logit above the 0.5 cut-off)
    logits[0, 0, 1, 1, 1] = 0.4  # logit 0.4: below the cut-off, so not predicted
    for _ in range(5):
        coords, labels = random_click(logits, gt, rng)
        assert coords[0, 0].tolist() == [0, 0, 0] and labels.item() == 0


def test_ritm_click_lands_in_the_interior_of_the_larger_error():
    rng = np.random.default_rng(1)
    gt = _gt(size=12, lo=2, hi=9)  # a 7^3 false-negative cube: EDT 4 at the centre, > 2 in the inner 3^3
    for _ in range(10):
        coords, labels = ritm_click(torch.zeros_like(gt), gt, rng)
        assert labels.item() == 1 and all(4 <= c <= 6 for c in coords[0, 0].tolist())


def test_ritm_click_tie_goes_to_the_false_positives_as_the_official_code():
    # a prediction shifted by one voxel along the first axis: a 1-voxel false-negative slab (x = 2) and a
    # 1-voxel false-positive slab (x = 9), both of EDT depth 1, so the official `fn_max > fp_max` is False
    gt = _gt(size=12, lo=2, hi=9)
    logits = torch.roll(torch.where(gt > 0, 5.0, -5.0), shifts=1, dims=2)
    fn, fp = (gt > 0) & (logits <= 0.5), (gt == 0) & (logits > 0.5)
    assert fn[0, 0, 2, 2:9, 2:9].all() and fn.sum() == 49 and fp[0, 0, 9, 2:9, 2:9].all() and fp.sum() == 49
    rng = np.random.default_rng(0)
    for _ in range(10):
        coords, labels = ritm_click(logits, gt, rng)
        assert labels.item() == 0 and fp[0, 0][tuple(coords[0, 0])]


def test_box_from_mask_is_the_bounding_box():
    gt = torch.zeros(1, 1, 10, 10, 10)
    gt[0, 0, 2:5, 3:8, 1:2] = 1
    assert box_from_mask(gt, np.random.default_rng(0)).tolist() == [[2, 3, 1, 4, 7, 1]]
    jittered = box_from_mask(gt, np.random.default_rng(0), jitter=2)[0]
    assert (jittered[:3] <= jittered[3:]).all() and (jittered - torch.tensor([2, 3, 1, 4, 7, 1])).abs().max() <= 2


def test_train_interaction_follows_the_official_schedule():
    cfg = small_config(image_size=32, patch_size=8)  # low-res 16^3
    calls = []

    def step(points=None, boxes=None, masks=None):
        calls.append((points, boxes, masks))
        return torch.full((1, 1, 16, 16, 16), float(len(calls)))

    loss, logits = train_interaction(step, _gt(32, 8, 20), np.random.default_rng(0), cfg, num_clicks=11)
    mask_only = [t for t, (p, b, _) in enumerate(calls) if p is None and b is None]
    assert len(calls) == 11 and mask_only[-1] == 10 and len(mask_only) == 2 and 2 <= mask_only[0] <= 8
    assert not calls[0][2].any() and all(calls[t][2][0, 0, 0, 0, 0] == t for t in range(1, 11))  # previous logits
    assert torch.all(logits == 11) and loss.item() > 0


def test_evaluate_points_reports_dice_per_click():
    cfg = small_config(image_size=32, patch_size=8)
    low_res = torch.where(_gt(16, 4, 12) > 0, 10.0, -10.0)
    up = torch.nn.functional.interpolate(low_res, size=32, mode="trilinear", align_corners=False)
    gt = (up > 0).float()  # what the step's logits predict, so every click scores Dice 1
    dice, _ = evaluate_points(lambda **_: low_res, gt, np.random.default_rng(0), cfg, num_clicks=3)
    assert dice.shape == (1, 3) and np.allclose(dice, 1.0)
    half = gt.clone()
    half[..., 16:] = 0  # the prediction covers twice the target: Dice 2|A|/(|A| + 2|A|) = 2/3
    dice, _ = evaluate_points(lambda **_: low_res, half, np.random.default_rng(0), cfg, num_clicks=2)
    assert np.allclose(dice, 2 / 3)


def _tiny_moe(num_experts=1):
    torch.manual_seed(0)
    sam = build_model(
        small_config(
            image_size=32,
            patch_size=4,
            encoder_dim=48,
            encoder_depth=1,
            global_attn_indexes=(0,),
            prompt_dim=48,
            decoder_mlp_dim=32,
        )
    )
    experts = [expert_from(sam) for _ in range(num_experts)]
    return SamMed3DMoE(
        sam,
        experts,
        GateConfig(tasks=tuple(f"t{i}" for i in range(num_experts)), dim=48, heads=4, mlp_dim=32, hidden_dim=16),
    )


def test_moe_step_fuses_general_and_top_expert_by_the_gate_score():
    moe = _tiny_moe()
    with torch.no_grad():
        for p in moe.experts[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
        moe.gate.fc2.bias.copy_(torch.tensor([0.0, 3.0]))  # push the specific expert above tau
    emb = torch.randn(2, 48, 8, 8, 8)
    points = (torch.tensor([[[3, 4, 5]], [[20, 1, 9]]]), torch.tensor([[1], [1]]))
    with torch.no_grad():
        out = moe.step(emb, points=points, masks=torch.zeros(2, 1, 32, 32, 32))
        general = moe.sam.decode(emb, points=points, masks=torch.zeros(2, 1, 32, 32, 32))
        expert = moe.sam.decode(emb, points=points, masks=torch.zeros(2, 1, 32, 32, 32), decoder=moe.experts[0])
    s = out["scores"][:, 1].reshape(2, 1, 1, 1, 1)
    assert (s > 0.5).all() and torch.allclose(out["general"], general) and torch.allclose(out["top"], expert)
    assert torch.allclose(out["fused"], (1 - s) * general + s * expert, atol=1e-6)


def test_only_the_top_expert_gets_a_gradient():
    moe = _tiny_moe(num_experts=2)
    with torch.no_grad():
        moe.gate.fc2.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # expert 2 ranks first
    out = moe.step(torch.randn(1, 48, 8, 8, 8), points=(torch.tensor([[[3, 4, 5]]]), torch.tensor([[1]])))
    assert out["top_index"].item() == 1
    out["fused"].sum().backward()
    assert moe.experts[0].iou_token.weight.grad is None or not moe.experts[0].mask_tokens.weight.grad.any()
    assert moe.experts[1].mask_tokens.weight.grad.abs().sum() > 0


def test_gate_learns_the_task_identity_with_cross_entropy():
    torch.manual_seed(0)
    gate = GatingNetwork(GateConfig(tasks=("lesion",), dim=48, heads=4, mlp_dim=32, hidden_dim=16))
    # task 0 images are "dark", task 1 images "bright": the gate must read the image embedding
    emb = torch.randn(8, 48, 2, 2, 2) * 0.1 + torch.tensor([-1.0] * 4 + [1.0] * 4).reshape(8, 1, 1, 1, 1)
    pe, sparse, task = torch.zeros(1, 48, 2, 2, 2), torch.randn(8, 2, 48), torch.tensor([0] * 4 + [1] * 4)
    opt = torch.optim.AdamW(gate.parameters(), lr=1e-2)
    first = gate_loss(gate(emb, pe, sparse), task).item()
    for _ in range(60):
        loss = gate_loss(gate(emb, pe, sparse), task)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    assert (gate(emb, pe, sparse).argmax(1) == task).all()


def test_each_expert_reads_a_box_through_its_own_corner_embeddings():
    import copy

    moe = _tiny_moe(num_experts=2)
    with torch.no_grad():
        for k in range(2):
            moe.expert_boxes[k].weight.normal_()  # as if each expert had trained its own box embeddings
            for p in moe.experts[k].parameters():
                p.add_(0.05 * torch.randn_like(p))
        moe.gate.fc2.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # expert 2 ranks first
    emb, box, masks = torch.randn(1, 48, 8, 8, 8), torch.tensor([[2, 3, 4, 20, 21, 22]]), torch.zeros(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = moe.step(emb, boxes=box, masks=masks)
        own = copy.deepcopy(moe.sam)
        own.prompt_encoder.box_corner_embeddings.weight.copy_(moe.expert_boxes[1].weight)
        want_top = own.decode(emb, boxes=box, masks=masks, decoder=moe.experts[1])
        with_general_corners = moe.sam.decode(emb, boxes=box, masks=masks, decoder=moe.experts[1])
        general = moe.sam.decode(emb, boxes=box, masks=masks)
    assert out["top_index"].item() == 1
    assert torch.allclose(out["top"], want_top, atol=1e-6) and not torch.allclose(out["top"], with_general_corners)
    assert torch.allclose(out["general"], general, atol=1e-6)  # the general decoder keeps the shared corners


def test_expert_tasks_name_every_dataset_and_route_their_targets():
    from sam_med3d_moe.tasks import ExpertTask, check_disjoint, expected_expert
    from shared.errors import InputError

    lesion = ExpertTask(datasets=("Tumour", "Stroke"))
    weak = ExpertTask(datasets=("Anatomy",), labels=(5, 3))
    assert lesion.name == "Stroke+Tumour" and weak.name == "Anatomy:labels3,5"
    assert ExpertTask.from_dict(weak.to_dict()) == weak
    tasks = [lesion, weak]
    # gate target: class k + 1 of the covering expert, 0 (general) otherwise; union targets have label None
    cases = {("Tumour", None): 1, ("Stroke", 2): 1, ("Anatomy", 3): 2, ("Anatomy", 5): 2, ("Anatomy", 4): 0,
             ("Anatomy", None): 0, ("Other", 3): 0}  # fmt: skip
    for (dataset, label), want in cases.items():
        assert expected_expert(tasks, dataset, label) == want, (dataset, label)
    check_disjoint([weak, ExpertTask(datasets=("Anatomy",), labels=(1, 2))], ["a", "b"])  # disjoint classes: fine
    for other in (ExpertTask(datasets=("Anatomy",), labels=(2, 5)), ExpertTask(datasets=("Anatomy", "X"))):
        with pytest.raises(InputError, match="both cover targets of Anatomy"):
            check_disjoint([weak, other], ["a.pt", "b.pt"])
    with pytest.raises(InputError, match="label values >= 1"):
        ExpertTask(datasets=("Anatomy",), labels=(0,))


def _naive_attention(att, q, k, v):
    """Multi-head attention written out head by head and token by token (independent of `Attention.forward`)."""
    qp, kp, vp = (x @ lin.weight.T + lin.bias for x, lin in ((q, att.q_proj), (k, att.k_proj), (v, att.v_proj)))
    heads, d = att.num_heads, qp.shape[-1] // att.num_heads
    out = torch.zeros_like(qp)
    for b in range(q.shape[0]):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for i in range(q.shape[1]):
                logits = torch.stack([qp[b, i, cols] @ kp[b, j, cols] / math.sqrt(d) for j in range(k.shape[1])])
                w = torch.exp(logits - logits.max())
                out[b, i, cols] = sum(w[j] / w.sum() * vp[b, j, cols] for j in range(k.shape[1]))
    return out @ att.out_proj.weight.T + att.out_proj.bias


def _naive_norm(norm, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def test_gate_follows_the_paper_steps_against_a_naive_implementation():
    torch.manual_seed(3)
    gate = GatingNetwork(GateConfig(tasks=("a", "b"), dim=8, heads=2, mlp_dim=6, hidden_dim=5))
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, 0.5)  # LayerNorm weights and biases included, so no step is an identity
    emb, pe, sparse = torch.randn(2, 8, 2, 2, 2), torch.randn(1, 8, 2, 2, 2), torch.randn(2, 3, 8)
    with torch.no_grad():
        got = gate(emb, pe, sparse)
        x_i = emb.reshape(2, 8, 8).permute(0, 2, 1)  # 8 image tokens of width 8
        pos = pe.reshape(1, 8, 8).permute(0, 2, 1)
        x_p = (sparse[:, 0] + sparse[:, 1] + sparse[:, 2])[:, None] / 3  # the mean prompt token
        x_p = _naive_norm(gate.norm1, x_p + _naive_attention(gate.self_attn, x_p, x_p, x_p))  # (1) self-attention
        x_p = _naive_norm(gate.norm2, x_p + _naive_attention(gate.cross_attn_prompt_to_image, x_p, x_i + pos, x_i))
        hidden = gate.mlp[0](x_p)  # (3) MLP with GELU
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x_p = _naive_norm(gate.norm3, x_p + hidden @ gate.mlp[2].weight.T + gate.mlp[2].bias)
        x_i = _naive_norm(gate.norm4, x_i + _naive_attention(gate.cross_attn_image_to_prompt, x_i + pos, x_p, x_p))
        pooled = x_i.mean(dim=1)  # (5) two FC layers (ReLU between) on the mean image token
        want = torch.clamp(pooled @ gate.fc1.weight.T + gate.fc1.bias, min=0) @ gate.fc2.weight.T + gate.fc2.bias
        other_prompt = gate(emb, pe, sparse + torch.randn_like(sparse))
    assert got.shape == (2, 3) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(other_prompt, got, atol=1e-3)  # the scores depend on the prompt tokens


class _FixedGate(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, image_embeddings, image_pe, sparse):
        return self.logits


def test_batched_top1_selection_matches_a_per_sample_loop():
    moe = _tiny_moe(num_experts=3)
    with torch.no_grad():
        for e in moe.experts:
            for p in e.parameters():
                p.add_(0.05 * torch.randn_like(p))
    # sample 0 -> expert 2 (used), sample 1 -> expert 0 (used), sample 2 -> expert 1 with s_top < tau (not used)
    logits = torch.tensor([[0.0, 0.0, 0.0, 4.0], [0.0, 3.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.5]])
    moe.gate = _FixedGate(logits)
    emb, masks = torch.randn(3, 48, 8, 8, 8), torch.zeros(3, 1, 32, 32, 32)
    points = (torch.tensor([[[3, 4, 5]], [[20, 1, 9]], [[7, 7, 7]]]), torch.tensor([[1], [1], [0]]))
    with torch.no_grad():
        out = moe.step(emb, points=points, masks=masks)
    scores = logits.softmax(-1)
    assert out["top_index"].tolist() == [2, 0, 1] and out["uses_expert"].tolist() == [True, True, False]
    for b, k in enumerate([2, 0, 1]):
        one = (points[0][b : b + 1], points[1][b : b + 1])
        with torch.no_grad():
            general = moe.sam.decode(emb[b : b + 1], points=one, masks=masks[b : b + 1])
            top = moe.sam.decode(emb[b : b + 1], points=one, masks=masks[b : b + 1], decoder=moe.experts[k])
        s = float(scores[b, k + 1])
        want = (1 - s) * general + s * top if s > 0.5 else general
        assert torch.allclose(out["top"][b : b + 1], top, atol=1e-5), b
        assert torch.allclose(out["fused"][b : b + 1], want, atol=1e-5), b
    with torch.no_grad():
        assert not moe.step(emb, points=points, masks=masks, mode="general")["uses_expert"].any()


def test_gate_training_steps_only_the_experts_the_selector_used():
    from sam_med3d_moe.train_gate import InteractiveMoE, drop_unchosen_grads, optimizer_groups

    moe = _tiny_moe(num_experts=2)
    groups = optimizer_groups(moe, gate_lr=1e-3, expert_lr=1e-2, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # no weight decay on the experts
    opt = torch.optim.AdamW(groups)
    forward = InteractiveMoE(moe)
    image, gt, rng = torch.randn(1, 1, 32, 32, 32), _gt(32, 8, 20), np.random.default_rng(0)

    def snapshot(k):
        return [p.detach().clone() for p in moe.experts[k].parameters()]

    def train_step(bias, target):
        with torch.no_grad():
            moe.gate.fc2.bias.copy_(torch.tensor(bias))
        seg, ce = forward(image, gt, torch.tensor([target]), rng, num_clicks=2)
        (seg + ce).backward()
        drop_unchosen_grads(moe.experts, forward.chosen)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return forward.chosen.tolist()

    before = snapshot(1)
    assert train_step([0.0, 6.0, 0.0], 1) == [True, False]  # expert 0 used, expert 1 never
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(1)))
    after_first = snapshot(0)
    for _ in range(3):  # now only expert 1: expert 0 keeps its weights (no momentum step, no decay)
        assert train_step([0.0, 0.0, 6.0], 2) == [False, True]
    assert all(torch.equal(a, b) for a, b in zip(after_first, snapshot(0)))
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(1)))
