"""Weight-only int8 quantization: half the memory of bf16, so Orion-MoE8x7B fits one 80 GB GPU.

Each output channel (row) of a weight matrix W (out, in) gets its own scale,

    s[o] = max_i |W[o, i]| / 127,     q[o, i] = round(W[o, i] / s[o])  in  -127 .. 127,

so W ~ q * s[:, None], off by at most s[o] / 2 per entry. Only the weights are int8; the
activations stay in the model's dtype, and a product W x is computed as (q x) * s, the
int8 matrix converted on the fly. Decoding at batch 1 is limited by reading weights from
memory, so one byte per weight instead of two is up to 2x faster where the conversion is
fused into the matmul (torch.compile, e.g. generate.py --compile); run eagerly it saves
memory but not time, as each weight is first converted to a full-precision copy.

Quantized: attention's wq, wk, wv, wo, every expert's w1, w3, w2 (per expert, per output
channel), and lm_head: 99% of the bytes. Kept in high precision: the embedding (a table
lookup, no matmul), the router (tiny, and its top-k choice is sensitive), the norms.
"""

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) -> q (..., out, in) int8, scale (..., out) in w's dtype."""
    w32 = w.float()
    scale = w32.abs().amax(dim=-1).clamp(min=1e-12) / 127  # (..., out); a zero row keeps scale > 0
    q = (w32 / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with an int8 weight (out, in) and per-output-channel scales (out,)."""

    def __init__(self, linear: nn.Linear, device=None):
        super().__init__()
        q, scale = quantize_int8(linear.weight.detach().to(device))
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype)) * self.scale


class Int8Experts(nn.Module):
    """Stacked expert weights (n_experts, out, in) in int8 with scales (n_experts, out).

    Stands in for the float Parameter that moe.py uses: `experts[e]` (an int or a tensor
    of expert ids) gives the dequantized weights of those experts, `unbind()` every
    expert's, and `.shape` is the shape.
    """

    def __init__(self, w: torch.Tensor, device=None):
        super().__init__()
        q, scale = quantize_int8(w.detach().to(device))
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    @property
    def shape(self):
        return self.weight.shape

    def __getitem__(self, e):
        return self.weight[e].to(self.scale.dtype) * self.scale[e][..., None]

    def unbind(self, dim: int = 0):
        """Every expert's dequantized weights, as moe_grouped takes them from a Parameter."""
        assert dim == 0, "experts are stacked along dim 0"
        return [self[e] for e in range(self.weight.shape[0])]


@torch.no_grad()
def quantize_model(model, device=None):
    """Replace `model`'s big matmul weights by int8 in place (see the module docstring) and
    return it. With `device`, each weight is moved there and quantized there one at a time,
    so a model loaded on the CPU reaches the GPU without ever being there in full precision
    (at most one float weight at a time); the remaining small tensors follow at the end."""
    for block in model.layers:
        for name in ("wq", "wk", "wv", "wo"):
            setattr(block.attn, name, Int8Linear(getattr(block.attn, name), device))
        for name in ("w1", "w3", "w2"):
            w = getattr(block.moe, name)
            delattr(block.moe, name)  # drop the float Parameter before registering the int8 module
            setattr(block.moe, name, Int8Experts(w, device))
    model.lm_head = Int8Linear(model.lm_head, device)
    return model.to(device) if device is not None else model
