"""Rotary position embeddings (RoPE).

Attention by itself does not know where a token sits. RoPE tells it by *rotating* each
query and key vector by an angle proportional to the token's position. The head's
`head_dim` numbers are treated as `head_dim / 2` two-dimensional planes; plane i turns at
frequency

    inv_freq[i] = theta ** (-2 i / head_dim),   i = 0 .. head_dim/2 - 1,

so at position p it is rotated by the angle p * inv_freq[i]. Low planes spin fast, high
planes slowly (Orion uses theta = 1e6, which makes the slowest plane nearly still over
8192 positions).

Because rotations compose, the dot product of a query rotated to position m and a key
rotated to position n depends only on m - n: attention sees *relative* positions.

Layout: Hugging Face's "rotate half" convention, which the released weights were trained
with. Plane i pairs element i with element i + head_dim/2 (not neighbours 2i, 2i+1), so
rotating x is

    x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1].
"""

import torch


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, plane) angle, each (max_seq_len, head_dim), float32.

    Each plane's angle appears twice, at i and i + head_dim/2, matching rotate_half.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_seq_len, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, head_dim) by the angles of its positions.

    cos, sin: (B, T, head_dim), already gathered at each token's position.
    """
    cos = cos.unsqueeze(1).to(x.dtype)  # (B, 1, T, head_dim): the same angle for every head
    sin = sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)  # rotate_half(x)
    return x * cos + rotated_half * sin
