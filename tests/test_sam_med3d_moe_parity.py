"""SAM-Med3D checkpoint compatibility on numbers: our modules vs the official ones (uni-medical/SAM-Med3D f3de1fa),
and our fast padded-window attention vs the literal official computation.

Run: pytest tests/test_sam_med3d_moe_parity.py

Both sides get the same deterministic weights (`recipe`, filled key by key, so the key names and shapes must
match) and the same inputs; `tests/fixtures/sam_med3d_moe_official_small.pt` holds the official modules' outputs
(small configurations + one full-size windowed and global ViT block) and the official vit_b_ori key/shape list.
The fixture contains only numbers produced by running the official code; it is rewritten with
    SAM_MED3D_REPO=/path/to/SAM-Med3D python tests/test_sam_med3d_moe_parity.py
and with SAM_MED3D_REPO set the live test also compares against that checkout directly.
"""

import importlib.util
import math
import os
from functools import partial
from pathlib import Path

import pytest
import torch

from sam_med3d_moe.config import SamConfig
from sam_med3d_moe.image_encoder import Block3D
from sam_med3d_moe.model import build_model, build_sam_med3d

FIXTURE = Path(__file__).parent / "fixtures" / "sam_med3d_moe_official_small.pt"
# small official-style model: 32^3 input, patch 8 -> 4^3 grid; window 6 pads it to one 6^3 window (the vit_b_ori
# situation), window 3 pads it to 2^3 windows; the decoder keeps the official hard-coded depth 2, 8 heads, MLP 2048
SMALL = dict(
    image_size=32,
    patch_size=8,
    encoder_dim=48,
    encoder_depth=3,
    encoder_heads=4,
    global_attn_indexes=(1,),
    prompt_dim=48,
    mask_in_chans=8,
    iou_head_hidden_dim=32,
)


def recipe(shapes: dict, seed: int) -> dict:
    """Deterministic weights for a {key: shape} dict (keys in sorted order, so both sides draw the same values)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        value = torch.randn(shape, generator=gen)
        if (
            key.endswith("norm_final_attn.weight")
            or (".norm" in key and key.endswith("weight"))
            or (
                len(shape) == 1
                and key.startswith(("image_encoder.neck.1", "image_encoder.neck.3"))
                and key.endswith("weight")
            )
        ):
            value = 1 + 0.1 * value
        elif "pos" in key or "embed" in key or "tokens" in key or "gaussian" in key:
            value = 0.5 * value
        elif len(shape) >= 2:
            value = value / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.1 * value
        out[key] = value
    return out


def inputs() -> dict:
    gen = torch.Generator().manual_seed(7)
    return {
        "image": torch.randn(2, 1, 32, 32, 32, generator=gen),
        "coords": torch.tensor([[[3, 17, 30], [12, 5, 9]], [[31, 0, 16], [8, 8, 8]]]),
        "labels": torch.tensor([[1, 0], [1, 1]]),
        "masks": torch.randn(2, 1, 16, 16, 16, generator=gen),
        "block_x": torch.randn(1, 8, 8, 8, 768, generator=gen),
    }


def run_modules(image_encoder, prompt_encoder, mask_decoder, x: dict) -> dict:
    """The outputs compared: encoder embedding, dense PE, sparse/dense prompts, decoder masks and IoU."""
    with torch.no_grad():
        emb = image_encoder(x["image"])
        pe = prompt_encoder.get_dense_pe()
        sparse, dense = prompt_encoder(points=(x["coords"], x["labels"]), boxes=None, masks=x["masks"])
        masks, iou = mask_decoder(
            image_embeddings=emb,
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        multi, _ = mask_decoder(
            image_embeddings=emb,
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        no_mask_sparse, no_mask_dense = prompt_encoder(points=(x["coords"], x["labels"]), boxes=None, masks=None)
    return {
        "embedding": emb,
        "dense_pe": pe,
        "sparse": sparse,
        "dense": dense,
        "masks": masks,
        "iou": iou,
        "multimask": multi,
        "no_mask_dense": no_mask_dense,
    }


def sampled(t: torch.Tensor) -> torch.Tensor:
    """A strided sample of a full-size block output (1, 8, 8, 8, 768), small enough for the fixture."""
    return t[0, ::3, ::3, ::3, ::16].clone()


def _set(module, seed):
    module.load_state_dict(recipe({k: v.shape for k, v in module.state_dict().items()}, seed))
    return module


def ours(window: int, blocks: bool = True) -> dict:
    """Our outputs for the small model with `window` and (with `blocks`) the two full-size blocks."""
    model = build_model(SamConfig(window_size=window, **SMALL))
    _set(model, seed=window)
    out = run_modules(model.image_encoder, model.prompt_encoder, model.mask_decoder, inputs())
    for name, w in (("block_window14", 14), ("block_global", 0)) if blocks else ():
        block = _set(Block3D(768, 12, 4.0, window=w, grid=8), seed=100 + w)
        with torch.no_grad():
            out[name] = sampled(block(inputs()["block_x"]))
    return out


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official(repo: Path, window: int) -> dict:
    """The official modules' outputs (built from a SAM-Med3D checkout) in the same setting as `ours`."""
    modeling = Path(repo) / "segment_anything" / "modeling"
    enc = _load(modeling / "image_encoder3D.py", "ref_image_encoder3D")
    pro = _load(modeling / "prompt_encoder3D.py", "ref_prompt_encoder3D")
    dec = _load(modeling / "mask_decoder3D.py", "ref_mask_decoder3D")
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    image_encoder = enc.ImageEncoderViT3D(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=4,
        mlp_ratio=4,
        out_chans=48,
        qkv_bias=True,
        norm_layer=norm,
        use_rel_pos=True,
        window_size=window,
        global_attn_indexes=[1],
    )
    prompt_encoder = pro.PromptEncoder3D(
        embed_dim=48, image_embedding_size=(4, 4, 4), input_image_size=(32, 32, 32), mask_in_chans=8
    )
    mask_decoder = dec.MaskDecoder3D(
        num_multimask_outputs=3, transformer_dim=48, iou_head_depth=3, iou_head_hidden_dim=32
    )
    shapes = {}
    for prefix, m in (
        ("image_encoder", image_encoder),
        ("prompt_encoder", prompt_encoder),
        ("mask_decoder", mask_decoder),
    ):
        shapes.update({f"{prefix}.{k}": v.shape for k, v in m.state_dict().items()})
    weights = recipe(shapes, seed=window)
    for prefix, m in (
        ("image_encoder", image_encoder),
        ("prompt_encoder", prompt_encoder),
        ("mask_decoder", mask_decoder),
    ):
        m.load_state_dict({k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")})
    out = run_modules(image_encoder, prompt_encoder, mask_decoder, inputs())
    for name, w in (("block_window14", 14), ("block_global", 0)):
        block = enc.Block3D(
            dim=768,
            num_heads=12,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=norm,
            use_rel_pos=True,
            window_size=w,
            input_size=(8, 8, 8),
        )
        _set(block, seed=100 + w)
        with torch.no_grad():
            out[name] = sampled(block(inputs()["block_x"]))
    return out


def official_vit_b_ori_shapes(repo: Path) -> dict:
    """Key -> shape of the official vit_b_ori modules (built on the meta device, arguments of _build_sam3D_ori)."""
    modeling = Path(repo) / "segment_anything" / "modeling"
    enc = _load(modeling / "image_encoder3D.py", "ref_image_encoder3D")
    pro = _load(modeling / "prompt_encoder3D.py", "ref_prompt_encoder3D")
    dec = _load(modeling / "mask_decoder3D.py", "ref_mask_decoder3D")
    with torch.device("meta"):
        parts = {
            "image_encoder": enc.ImageEncoderViT3D(
                depth=12,
                embed_dim=768,
                img_size=128,
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=12,
                patch_size=16,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=[2, 5, 8, 11],
                window_size=14,
                out_chans=384,
            ),
            "prompt_encoder": pro.PromptEncoder3D(
                embed_dim=384, image_embedding_size=(8, 8, 8), input_image_size=(128, 128, 128), mask_in_chans=16
            ),
            "mask_decoder": dec.MaskDecoder3D(
                num_multimask_outputs=3, transformer_dim=384, iou_head_depth=3, iou_head_hidden_dim=256
            ),
        }
    return {f"{p}.{k}": list(v.shape) for p, m in parts.items() for k, v in m.state_dict().items()}


def _assert_close(name, got, want, atol=2e-5, rtol=1e-4):
    diff = (got - want).abs()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"{name}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} is missing (write it with SAM_MED3D_REPO=... python {__file__})")
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def test_vit_b_ori_keys_and_shapes_equal_the_official_list(fixture):
    with torch.device("meta"):
        model = build_sam_med3d()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == fixture["vit_b_ori_shapes"]
    assert len(got) == 324
    assert sum(p.numel() for p in model.parameters()) == 100_509_232


def test_outputs_equal_the_official_modules(fixture):
    for window in (6, 3):
        got = ours(window, blocks=window == 6)  # the full-size blocks do not depend on the small model's window
        for name, want in fixture[f"window{window}"].items():
            if name in got:
                _assert_close(f"window {window} {name}", got[name], want)


def test_padded_window_differs_from_plain_global_attention():
    # the trap of the fact sheet: porting the padded 14^3 window as global 8^3 attention changes the output
    x = inputs()["block_x"][..., :48]  # a narrow block: the padding effect does not depend on the width
    windowed = _set(Block3D(48, 4, 4.0, window=14, grid=8), seed=3)
    # global attention over the 8^3 tokens with the same relative-position rows (offsets -7..7 of the 27)
    plain = Block3D(48, 4, 4.0, window=0, grid=8)
    weights = windowed.state_dict()
    plain.load_state_dict({k: v[6:21] if "rel_pos" in k else v for k, v in weights.items()})
    with torch.no_grad():
        assert (windowed(x) - plain(x)).abs().max() > 1e-3


def _random_block(dim, heads, window, grid, seed):
    """A block with every parameter random (rel-pos tables and qkv biases included, so every term matters)."""
    block = Block3D(dim, heads, 4.0, window=window, grid=grid)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            scale = 0.3 if p.dim() < 2 else p.shape[-1] ** -0.5
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return block


@pytest.mark.parametrize("dim,heads,window,grid", [(48, 4, 6, 4), (24, 2, 5, 3), (32, 4, 14, 8)])
def test_fast_padded_window_equals_the_literal_official_computation(dim, heads, window, grid):
    # the default path (real queries only, padded keys in closed form) against padding + attention over every
    # padded token (the official computation; the fixture test above checks the full-size 14^3 block too):
    # outputs, input gradients and parameter gradients
    block = _random_block(dim, heads, window, grid, seed=window)
    x = torch.randn(2, grid, grid, grid, dim, generator=torch.Generator().manual_seed(1))
    results = []
    for literal in (False, True):
        block.literal_padding = literal
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (fast, fast_dx, fast_dp), (lit, lit_dx, lit_dp) = results
    _assert_close("output", fast, lit, atol=1e-5)
    _assert_close("input gradient", fast_dx, lit_dx, atol=1e-5)
    for name in lit_dp:
        _assert_close(f"gradient of {name}", fast_dp[name], lit_dp[name], atol=1e-4)


def test_default_path_skips_the_padded_window_and_literal_padding_uses_it(monkeypatch):
    import sam_med3d_moe.image_encoder as encoder

    block = _random_block(24, 2, 5, 3, seed=0)
    x = torch.randn(1, 3, 3, 3, 24)

    def refuse(*args, **kwargs):
        raise AssertionError("window_partition called")

    monkeypatch.setattr(encoder, "window_partition", refuse)
    with torch.no_grad():
        block(x)  # the fast path never builds the 5^3 padded window
        block.literal_padding = True
        with pytest.raises(AssertionError, match="window_partition called"):
            block(x)


def test_live_against_official_checkout():
    repo = os.environ.get("SAM_MED3D_REPO")
    if not repo or not (Path(repo) / "segment_anything" / "modeling" / "image_encoder3D.py").is_file():
        pytest.skip("set SAM_MED3D_REPO to a SAM-Med3D checkout to compare live")
    for window in (6, 3):
        want, got = official(Path(repo), window), ours(window)
        for name in want:
            _assert_close(f"live window {window} {name}", got[name], want[name])


if __name__ == "__main__":
    repo = Path(os.environ["SAM_MED3D_REPO"])
    payload = {f"window{w}": official(repo, w) for w in (6, 3)}
    payload["vit_b_ori_shapes"] = official_vit_b_ori_shapes(repo)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB)")
