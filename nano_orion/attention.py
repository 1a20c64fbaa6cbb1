"""Causal grouped-query attention with a key/value cache.

Each token's vector x (dim numbers) is projected to

    q = x Wq: n_heads    vectors of head_dim numbers  ("what am I looking for?")
    k = x Wk: n_kv_heads vectors of head_dim numbers  ("what do I contain?")
    v = x Wv: n_kv_heads vectors of head_dim numbers  ("what do I pass on?")

and every query head mixes the values of earlier tokens, weighted by

    softmax(q . k / sqrt(head_dim))   over the keys the mask allows.

Grouped-query attention (GQA): there are fewer key/value heads than query heads. Query
head h reads kv head h // (n_heads // n_kv_heads), so groups of query heads share keys and
values (Orion: 32 query heads, 8 kv heads, groups of 4). That shrinks the KV cache 4x.
With n_kv_heads == n_heads it is ordinary multi-head attention; with 1 it is multi-query.

The mask says which keys a query may see:
  * causal: a token sees itself and the tokens before it, never the future;
  * padding: in a left-padded batch, pad columns are hidden from real tokens.

The KV cache: when generating, the keys and values of past tokens never change, so each
layer keeps them in a preallocated buffer and only the new token's k, v are computed.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import OrionConfig
from .rope import apply_rope


class KVCache:
    """One layer's keys and values for the first `max_len` positions of a batch."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) at positions start_pos.. and return all keys
        and values so far, (B, n_kv_heads, start_pos + T, head_dim)."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attention_mask(T: int, start_pos: int = 0, pad_mask: torch.Tensor | None = None, device=None):
    """Which keys each query may attend to: a bool tensor (B or 1, 1, T, start_pos + T), True = visible.

    Queries are positions start_pos .. start_pos + T - 1, keys are 0 .. start_pos + T - 1.
    pad_mask (B, >= start_pos + T), True for real tokens, hides pad columns; every query
    still sees itself, so that a pad row is never left with nothing to attend to.
    Returns None where no mask is needed (no padding, and either no cache offset, which
    scaled_dot_product_attention handles fastest with is_causal=True, or a single query,
    which sees every key so far).
    """
    if pad_mask is None and (start_pos == 0 or T == 1):
        return None
    S = start_pos + T
    q_pos = torch.arange(start_pos, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos  # (T, S) causal
    if pad_mask is None:
        return mask[None, None]
    visible = pad_mask[:, None, :S] | (k_pos == q_pos)  # (B, T, S)
    return (mask & visible)[:, None]


class Attention(nn.Module):
    def __init__(self, config: OrionConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, start_pos: int = 0):
        """x (B, T, dim) -> (B, T, dim). cos, sin (B, T, head_dim); mask from attention_mask()."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, n_kv_heads, start_pos + T, head_dim)
        # softmax(q k^T / sqrt(head_dim) + mask) v, each query head reading its group's kv head.
        if T == 1 and mask is None:
            # One new token (decoding): a group's query heads all read the same kv head and
            # every key so far, so they can be stacked as the queries of that kv head; plain
            # attention, no mask, a single small kernel per step.
            group = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, group, self.head_dim), k, v)
            y = y.view(B, self.n_heads, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(y)
