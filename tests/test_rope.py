"""Rotary position embeddings."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_orion.rope import apply_rope, rope_cos_sin


def rotate(x, positions, cos, sin):
    """x (1, H, T, D) rotated at the given positions."""
    return apply_rope(x, cos[positions][None], sin[positions][None])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 8, 32, 128]), st.integers(0, 2**16), st.sampled_from([1e4, 1e6]))
def test_rotation_preserves_norms(head_dim, seed, theta):
    cos, sin = rope_cos_sin(head_dim, 512, theta)
    x = torch.randn(1, 3, 10, head_dim, generator=torch.Generator().manual_seed(seed))
    positions = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(rotate(x, positions, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([2, 8, 64]), st.integers(0, 2**16), st.integers(0, 400), st.integers(0, 400), st.integers(0, 100)
)
def test_dot_product_depends_only_on_position_difference(head_dim, seed, m, n, shift):
    cos, sin = rope_cos_sin(head_dim, 512, 1e6)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def score(a, b):
        return (rotate(q, torch.tensor([a]), cos, sin) * rotate(k, torch.tensor([b]), cos, sin)).sum()

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-4, atol=1e-4)


def test_angles_by_hand():
    """inv_freq_i = theta^(-2i/d), each appearing at i and i + d/2 (rotate-half layout)."""
    head_dim, theta = 8, 100.0
    cos, sin = rope_cos_sin(head_dim, 4, theta)
    for p in range(4):
        for i in range(head_dim // 2):
            angle = p * theta ** (-2 * i / head_dim)
            for j in (i, i + head_dim // 2):
                assert math.isclose(cos[p, j].item(), math.cos(angle), abs_tol=1e-6)
                assert math.isclose(sin[p, j].item(), math.sin(angle), abs_tol=1e-6)
    # rotate-half pairs element i with i + d/2: a vector on element 0 turns towards element d/2.
    x = torch.zeros(1, 1, 1, head_dim)
    x[..., 0] = 1.0
    y = rotate(x, torch.tensor([1]), cos, sin)[0, 0, 0]
    assert math.isclose(y[0].item(), math.cos(1.0), abs_tol=1e-6)
    assert math.isclose(y[head_dim // 2].item(), math.sin(1.0), abs_tol=1e-6)
