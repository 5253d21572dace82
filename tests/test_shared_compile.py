"""The one torch.compile smoke test of the suite (~30-60 s on CPU): a compiled 3D conv net matches eager mode.

Run: pytest tests/test_shared_compile.py
"""

import torch

from shared.harness import maybe_compile


def test_compiled_model_matches_eager_and_saves_the_uncompiled_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, kernel_size=3, padding=1),
        torch.nn.InstanceNorm3d(4, affine=True),
        torch.nn.LeakyReLU(0.01),
        torch.nn.Conv3d(4, 2, kernel_size=1),
    )
    forward_model, to_save = maybe_compile(model, enabled=True)
    assert to_save is model and forward_model is not model
    x = torch.randn(2, 1, 8, 8, 8)
    eager = model(x)
    compiled = forward_model(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    compiled.sum().backward()  # the backward graph compiles and reaches the original parameters
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
    assert not any(k.startswith("_orig_mod.") for k in to_save.state_dict())
