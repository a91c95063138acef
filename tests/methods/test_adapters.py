"""Shared adapters: identity/linear choice, token layout helpers, the frozen teacher norm."""
import pytest
import torch
import torch.nn as nn

from featcache.methods import MethodContext
from featcache.methods._adapters import (FrozenLayerNorm, frozen_teacher_norm, grid_of, make_adapter, resize_tokens,
                                         split_prefix, to_tokens)


def test_make_adapter_modes():
    assert isinstance(make_adapter(8, 8), nn.Identity)
    assert isinstance(make_adapter(8, 8, "linear"), nn.Linear)
    lin = make_adapter(4, 8)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (8, 4) and lin.bias is not None
    with pytest.raises(ValueError, match="equal widths"):
        make_adapter(4, 8, "identity")
    with pytest.raises(ValueError, match="unknown"):
        make_adapter(4, 8, "conv")


def test_token_helpers():
    x = torch.arange(24.0).view(1, 2, 3, 4)
    tokens = to_tokens(x)
    assert tokens.shape == (1, 12, 2) and tokens[0, 5].tolist() == [5.0, 17.0]  # row-major (h=1, w=1)
    prefix, patch = split_prefix(torch.zeros(2, 17, 3), 1)
    assert prefix.shape == (2, 1, 3) and patch.shape == (2, 16, 3)
    assert grid_of(16) == (4, 4) and grid_of(12, (3, 4)) == (3, 4)
    with pytest.raises(ValueError, match="square"):
        grid_of(17)
    assert resize_tokens(tokens, (3, 4), (3, 4)) is tokens
    assert resize_tokens(torch.ones(2, 4, 5), (2, 2), (4, 4)).shape == (2, 16, 5)


def test_frozen_teacher_norm_matches_layernorm_and_is_not_trainable(ctx):
    norm = frozen_teacher_norm(ctx)
    ref = ctx.teacher_final_norm()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    frozen = FrozenLayerNorm.from_module(ref)
    x = torch.randn(2, 5, ref.weight.numel())
    assert torch.allclose(frozen(x), ref(x), atol=1e-6)
    assert not list(norm.parameters()) and len(list(norm.buffers())) == 2
    assert norm.state_dict() == {}  # rebuilt from the manifest, never checkpointed
    assert norm.to(torch.float64).weight.dtype == torch.float64
    bare = ctx.manifest.copy()  # the session manifest is shared: never mutate it
    bare["teacher"]["final_norm"] = None
    with pytest.raises(ValueError, match="no final LayerNorm"):
        frozen_teacher_norm(MethodContext(bare, ctx.student, ctx.img_size))
