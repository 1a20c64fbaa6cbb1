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
layer keeps them in a buffer of fixed size, written slot by slot, and only the new
token's k, v are computed. Its shape never changes and the slots to write are a tensor,
so a compiled decoding step can be recorded once and replayed for every token (a CUDA
graph: docs/10_fast_decoding.md).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import OrionConfig
from .rope import apply_rope


class KVCache:
    """One layer's keys and values for `max_len` positions (slots) of a batch."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


def attention_mask(slots: torch.Tensor, n_keys: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query may attend to: bool (1 or B, 1, T, n_keys), True = visible.

    Queries sit at slots (T,); keys at slots 0 .. n_keys - 1 (a whole KV cache, say).
    Causal: a query sees the keys at or before its own slot, so the cache's unwritten
    slots stay hidden. pad_mask (B, any length), True at real tokens, also hides pad keys;
    every query still sees itself, so a pad row is never left with nothing to attend to.
    """
    keys = torch.arange(n_keys, device=slots.device)
    mask = keys <= slots[:, None]  # (T, n_keys)
    if pad_mask is None:
        return mask[None, None]
    real = F.pad(pad_mask, (0, n_keys - pad_mask.shape[1]), value=True)  # cut or extended to (B, n_keys)
    visible = real[:, None, :] | (keys == slots[:, None])  # (B, T, n_keys)
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

    def new_cache(self, batch_size: int, max_len: int, dtype) -> KVCache:
        """An empty KV cache for this layer, on the device of its weights."""
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, dtype, self.wq.weight.device)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, slots=None):
        """x (B, T, dim) -> (B, T, dim). cos, sin (1 or B, T, head_dim) at the tokens' positions.

        mask None: plain causal attention among these T tokens (training, or a prompt written
        into an empty cache). With a mask from attention_mask(), the queries read every slot
        of the cache (the mask hides the unwritten and padded ones), or without a cache the
        T tokens. cache, slots (T,): the new k, v are written into the cache at these slots.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # store the new k, v at their slots
            cache.k.index_copy_(2, slots, k)
            cache.v.index_copy_(2, slots, v)
            if mask is not None:
                k, v = cache.k, cache.v  # (B, n_kv_heads, max_len, head_dim)
        # softmax(q k^T / sqrt(head_dim) + mask) v, each query head reading its group's kv head.
        group = self.n_heads // self.n_kv_heads
        if T == 1:
            # One new token (decoding): a group's query heads all read the same kv head under
            # the same mask, so they are stacked as that kv head's queries, without copying the
            # keys and values per head. The formula is written out, in float32 as fused kernels
            # compute it: for one query that is as quick, and a compiled step fuses it with the rest.
            q = q.reshape(B, self.n_kv_heads, group, self.head_dim).float()
            scores = q @ k.float().transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, n_kv_heads, group, n_keys)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = (scores.softmax(dim=-1) @ v.float()).to(v.dtype)  # (B, n_kv_heads, group, head_dim)
        elif mask is None:  # causal among these T tokens: the fused kernels share the kv heads themselves
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(
                1, 2
            )  # (B, T, n_heads, head_dim)
        else:  # a mask (a padded batch, or a cache holding earlier tokens): each kv head is first
            # copied for its group's query heads, the form every kernel takes (docs/04_attention.md)
            k, v = (
                k.repeat_interleave(group, dim=1),
                v.repeat_interleave(group, dim=1),
            )  # (B, n_heads, n_keys, head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # (B, T, n_heads, head_dim)
        # reshape, not view: the layout of y depends on the kernel that computed it
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))
