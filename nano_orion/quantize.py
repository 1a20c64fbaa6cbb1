"""Weight-only int8 quantization: half the memory of bf16, so Orion-MoE8x7B fits one 80 GB GPU.

Each output channel (row) of a weight matrix W (out, in) gets its own scale,

    s[o] = max_i |W[o, i]| / 127,     q[o, i] = round(W[o, i] / s[o])  in  -127 .. 127,

so W ~ q * s[:, None], off by at most s[o] / 2 per entry. Only the weights are int8; the
activations stay in the model's dtype, and a product W x is computed as (q x) * s: the
scale multiplies the outputs, never a converted copy of the weights. Decoding at batch 1
is limited by reading weights from memory, so one byte per weight instead of two is up to
2x faster, where the conversion happens as each weight is read: gemv.expert_gemv's kernel
on a GPU, fast.gemv_fused compiled on the CPU. Many tokens at once (a prompt) are limited
by arithmetic instead, and there the weights are converted first and multiplied as usual.

Quantized: attention's wq, wk, wv, wo, every expert's w1, w3, w2 (per expert, per output
channel), and lm_head: 99% of the bytes. Kept in high precision: the embedding (a table
lookup, no matmul), the router (tiny, and its top-k choice is sensitive), the norms.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import gemv
from .fast import DECODE_TOKENS, fuses_gemv, gemv_fused, grouped_mm_dtype, moe_gathered, moe_grouped_mm
from .moe import Experts, moe_grouped


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) -> q (..., out, in) int8, scale (..., out) in w's dtype."""
    w32 = w.float()
    scale = w32.abs().amax(dim=-1).clamp(min=1e-12) / 127  # (..., out); a zero row keeps scale > 0
    q = (w32 / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    return q.to(dtype) * scale[..., None].to(dtype)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with an int8 weight (out, in) and per-output-channel scales (out,)."""

    def __init__(self, linear: nn.Linear, device=None):
        super().__init__()
        q, scale = quantize_int8(linear.weight.detach().to(device))
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) <= DECODE_TOKENS and gemv.use_triton(x):  # decoding: int8 read and converted in the kernel
            y = gemv.expert_gemv(
                rows, self.weight[None], torch.zeros(len(rows), dtype=torch.long, device=x.device), self.scale[None]
            )
            return y.view(*x.shape[:-1], -1)
        if fuses_gemv(x):  # compiled on the CPU: int8 read and converted in the fused loop
            return gemv_fused(x, self.weight, self.scale)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)


class Int8Experts(nn.Module):
    """moe.Experts with int8 weights, (n_experts, out, in), and their scales (n_experts, out).
    A few tokens read only their chosen experts, converting as they read (fast.moe_gathered);
    many convert every expert's weights first and run the grouped computation as
    fast.FastExperts would."""

    def __init__(self, experts: Experts, device=None):
        super().__init__()
        for name in ("w1", "w3", "w2"):
            q, scale = quantize_int8(getattr(experts, name).detach().to(device))
            self.register_buffer(name, q)
            self.register_buffer("scale_" + name, scale)

    def forward(self, x, weights, experts):
        if len(x) <= DECODE_TOKENS:
            scales = (self.scale_w1, self.scale_w3, self.scale_w2)
            return moe_gathered(x, weights, experts, self.w1, self.w3, self.w2, scales)
        w1, w3, w2 = (dequantize(getattr(self, n), getattr(self, "scale_" + n), x.dtype) for n in ("w1", "w3", "w2"))
        dtype = grouped_mm_dtype(x, w1.shape[1], torch.compiler.is_compiling())
        if dtype is None:
            return moe_grouped(x, weights, experts, w1, w3, w2)
        return moe_grouped_mm(x, weights, experts, w1, w3, w2, dtype)


def quantize_block(block, device=None):
    """One transformer block's attention projections and experts to int8, in place (quantize_model)."""
    for name in ("wq", "wk", "wv", "wo"):
        setattr(block.attn, name, Int8Linear(getattr(block.attn, name), device))
    block.moe.router.to(device)
    block.moe.experts = Int8Experts(block.moe.experts, device)


@torch.no_grad()
def quantize_model(model, device=None):
    """Replace `model`'s big matmul weights by int8 in place (see the module docstring) and
    return it. With `device`, each weight is moved there and quantized there one at a time,
    so a model loaded on the CPU reaches the GPU without ever being there in full precision
    (at most one float weight at a time); the remaining small tensors follow at the end."""
    for block in model.layers:
        quantize_block(block, device)
    model.lm_head = Int8Linear(model.lm_head, device)
    return model.to(device) if device is not None else model
