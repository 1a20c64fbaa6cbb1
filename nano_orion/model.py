"""The Orion-MoE decoder: embeddings -> n_layers blocks -> final norm -> logits.

    x = embed(idx)                                   # (B, T, dim)
    for each block:
        x = x + attention(norm1(x))                  # tokens exchange information
        x = x + moe(norm2(x))                        # each token is processed by its top_k experts
    logits = lm_head(norm(x))                        # (B, T, vocab_size), float32

`Orion.forward` returns the logits; `Orion.loss` the training loss, computed straight from
norm(x) without ever holding all the logits (loss.py).

"Pre-norm": each sub-layer reads a normalised copy of x and adds its result back, so the
residual stream x carries information from the embedding to the head unchanged.

Normalisation comes in two flavours (config.norm_type):
  * "layernorm": subtract the mean, divide by the standard deviation, then scale and
    shift (weight and bias): Orion-14B's choice;
  * "rmsnorm": divide by the root mean square, then scale (weight only): Mixtral's choice.
Which one the released Orion-MoE8x7B uses is decided from its weights (docs/09_loading.md).
"""

import math

import torch
from torch import nn

from .attention import Attention, KVCache, attention_mask
from .config import OrionConfig
from .loss import cross_entropy
from .moe import MoE
from .rope import rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in float32, also for bf16 models
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: OrionConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.dim, eps=config.norm_eps)
    return RMSNorm(config.dim, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: OrionConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.moe_norm = make_norm(config)
        self.moe = MoE(config)

    def forward(self, x, cos, sin, mask, cache, slots):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, slots)
        return x + self.moe(self.moe_norm(x))


class Orion(nn.Module):
    """The model as this file's docstring draws it. Its experts run moe.py's one plain way;
    fast.accelerate(model) swaps in the faster ways (nano_orion.load does)."""

    def __init__(self, config: OrionConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_rope()
        self.init_weights()

    def init_rope(self, device=None):
        """Compute the RoPE tables (not saved in checkpoints). Loaders that build the
        model on the meta device call this again with the real device."""
        c = self.config
        cos, sin = rope_cos_sin(c.head_dim, c.max_seq_len, c.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random weights for training from scratch: N(0, std) everywhere, with the two
        projections that write into the residual stream (attention's wo and the experts'
        w2) scaled down by sqrt(2 n_layers) so the stream's variance does not grow with depth.
        Norms start as the identity (weight 1, bias 0)."""
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.constant_(p, 1.0 if name.endswith("weight") else 0.0)
            else:
                nn.init.normal_(p, mean=0.0, std=out_std if name.endswith(("wo.weight", "w2")) else std)

    def new_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens, one per layer."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {self.config.max_seq_len}")
        dtype = self.embed.weight.dtype  # the activations' dtype
        return [block.attn.new_cache(batch_size, max_len, dtype) for block in self.layers]

    def forward(self, idx, cache=None, start_pos=0, pad_mask=None, last_only: bool = False):
        """idx (B, T) int64 token ids -> logits (B, T, vocab_size) float32; the arguments are hidden()'s.

        last_only: the logits of the last position only, (B, 1, vocab_size): all that generating
            the next token needs (8192 positions of Orion's vocabulary are 3.7 GB in float32).
        """
        x = self.hidden(idx, cache, start_pos, pad_mask)
        return self.lm_head(x[:, -1:] if last_only else x).float()

    def loss(self, idx, targets):
        """The mean cross-entropy of predicting targets (B, T) int64 from idx (B, T): a 0-d
        float32 tensor, computed without holding all the logits (loss.py)."""
        if not self.lm_head.weight.is_floating_point():  # e.g. int8 (quantize.py): the weight is not the matrix
            raise ValueError(
                "loss() needs a float output layer; for a quantized model, compute the cross-entropy of its logits"
            )
        return cross_entropy(self.hidden(idx).flatten(0, 1), self.lm_head.weight, targets.flatten())

    def hidden(self, idx, cache=None, start_pos=0, pad_mask=None):
        """idx (B, T) int64 token ids -> the final hidden vectors norm(x), (B, T, dim).

        cache, start_pos: with a cache from new_cache(), idx holds the tokens at positions
            start_pos .. start_pos + T - 1 and attends to the cached ones before them.
            start_pos is an int, or a 0-d tensor that a compiled decoding step reads on the
            device (docs/10_fast_decoding.md): then nothing about it is checked.
        pad_mask (B, >= start_pos + T) bool, True at real tokens: for left-padded batches.
            Each row's positions count its real tokens only, so padding changes nothing.
        """
        B, T = idx.shape
        if isinstance(start_pos, int):
            self.check_positions(B, T, cache, start_pos, pad_mask)
        slots = start_pos + torch.arange(T, device=idx.device)  # (T,) where the tokens sit in the sequence
        positions = slots[None]  # (1 or B, T): the RoPE position of each token, its slot ...
        if pad_mask is not None:  # ... minus the padding before it (a pad slot gets 0; its output is never used)
            positions = (pad_mask.long().cumsum(-1)[:, slots] - 1).clamp(min=0)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (1 or B, T, head_dim)
        if pad_mask is None and isinstance(start_pos, int) and start_pos == 0:
            mask = None  # plain causal attention among the T tokens: the fastest kernels
        else:
            mask = attention_mask(slots, T if cache is None else cache[0].k.shape[2], pad_mask)

        x = self.embed(idx)  # (B, T, dim)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, None if cache is None else cache[i], slots)
        return self.norm(x)

    def routing(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's routing in the last forward pass: the router's probs (B*T, n_experts)
        and the chosen experts (B*T, top_k), for the load-balancing loss (moe.load_balancing_loss)
        and for inspecting which experts the tokens went to."""
        return [block.moe.routing for block in self.layers]

    def check_positions(self, B: int, T: int, cache, start_pos: int, pad_mask) -> None:
        """Refuse inconsistent arguments with a reason, instead of failing inside attention."""
        end = start_pos + T
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if cache is not None and end > cache[0].k.shape[2]:
            raise ValueError(f"the KV cache holds {cache[0].k.shape[2]} positions, asked to write up to {end}")
        if start_pos > 0 and cache is None:
            raise ValueError(
                f"start_pos={start_pos} needs the KV cache holding positions 0..{start_pos - 1} (model.new_cache)"
            )
        if pad_mask is not None and (pad_mask.shape[0] != B or pad_mask.shape[1] < end):
            raise ValueError(
                f"pad_mask must cover every position so far, shape ({B}, >= {end}); got {tuple(pad_mask.shape)}"
            )
