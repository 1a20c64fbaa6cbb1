"""Faster ways to run the experts and the linears, swapped in for the plain ones (`accelerate`).

The model's modules compute everything one plain way (moe.py: the experts sort the tokens
into one block per expert and multiply the blocks one by one). That is right everywhere
and fast nowhere in particular. The hardware offers quicker ways to compute exactly the
same mixture, depending on how many tokens there are and where they are:

  * many tokens (training, a prompt): one F.grouped_mm multiplies every expert's block in
    one kernel, without asking the host how big each block is (`moe_grouped_mm`). It runs
    on CUDA from torch 2.9 (bf16, sm80 and later) and on the CPU from torch 2.13, which
    `grouped_mm_dtype` finds out; elsewhere the plain blocks serve;
  * a few tokens and no gradients (decoding on a GPU, or in a compiled decoding step):
    reading the weights is the cost, so each (token, slot) pair multiplies only its
    expert's weights, read in place by gemv.py's kernel (`moe_gathered`), without the host
    learning which experts were chosen;
  * one token on the CPU: its top_k experts one after another (`moe_one_token`).

The other matrices, attention's projections, the router and the output layer, are plain
nn.Linear. In a compiled decoding step on the CPU a one-row matmul is the wrong kernel: each
call of the matmul library costs microseconds of its own (a bf16 one goes to a oneDNN kernel
with a high fixed cost), and an int8 weight would be converted to a float copy first. Written
as a product and a sum instead (`gemv_fused`), the compiler (Inductor, behind torch.compile
and the CPU's ahead-of-time step, aot.py) turns x @ W.T into one loop that reads each weight
once, in its own dtype, accumulates in float32 and runs among the step's other generated loops.
`FastLinear` does that where it pays and is plain nn.Linear elsewhere;
`accelerate_linears(model)` puts it in place (compile_decode_step does), and
quantize.Int8Linear computes the same way. The loop reads x, one row, once per output row:
`computed_once` makes the compiled step write x to memory first, in float32, rather than
recompute its producer (a norm, say) or convert a bfloat16 x again in every output row.

`FastExperts` chooses among them each call and holds the very parameters of the plain
`Experts` it replaces, so a swapped model trains, saves and loads as before.
`accelerate(model)` puts them in place, the way quantize.quantize_model puts int8 in place
(its experts choose the same way). `Orion(config)` is the plain model; `nano_orion.load`,
train.py, generate.py, compile_decode_step and the benchmarks accelerate the models they run.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .gemv import expert_gemv
from .moe import Experts, expert_counts, expert_ffn, moe_grouped

DECODE_TOKENS = 8  # up to this many tokens (and no gradients), decoding's ways serve
TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])


def grouped_mm_dtype(x: torch.Tensor, ffn_dim: int, compiling: bool) -> torch.dtype | None:
    """The dtype F.grouped_mm would multiply x's rows (N, dim) in, or None where it does not
    run. The dtype is autocast's where it is on, else x's. F.grouped_mm runs on CUDA from
    torch 2.9 in bfloat16 on sm80 and later, on the CPU from torch 2.13 (there, under
    torch.compile, in bfloat16 only); in bfloat16 the rows must be a multiple of 16 bytes long."""
    device = x.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
    if not hasattr(F, "grouped_mm") or (dtype == torch.bfloat16 and (x.shape[1] % 8 or ffn_dim % 8)):
        return None
    if device.type == "cuda":
        runs = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    else:
        runs = device.type == "cpu" and TORCH_VERSION >= (2, 13) and (dtype == torch.bfloat16 or not compiling)
    return dtype if runs else None


def moe_grouped_mm(x, weights, experts, w1, w3, w2, dtype):
    """moe.moe_grouped with every block multiplied in one F.grouped_mm per projection, in
    `dtype` (grouped_mm_dtype), all on the device."""
    N, top_k = experts.shape
    order = experts.flatten().argsort(stable=True)  # (token, slot) pairs sorted by expert
    token = order // top_k  # the token of each sorted pair
    counts = expert_counts(experts, w1.shape[0])  # block sizes
    ends = counts.cumsum(0, dtype=torch.int32)  # where each block ends
    xs = x[token].to(dtype)  # (N * top_k, dim); grouped_mm is not autocast's: the operands are cast here
    w1, w3, w2 = w1.to(dtype), w3.to(dtype), w2.to(dtype)
    # block e of the rows times w[e]^T, every block in one kernel
    h = F.silu(F.grouped_mm(xs, w1.transpose(-2, -1), offs=ends)) * F.grouped_mm(xs, w3.transpose(-2, -1), offs=ends)
    y = F.grouped_mm(h, w2.transpose(-2, -1), offs=ends)
    y = (y * weights.flatten()[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)  # sum each token's top_k outputs


def moe_gathered(x, weights, experts, w1, w3, w2, scales=(None, None, None)):
    """Same as moe.moe_reference for a few tokens: each (token, slot) pair multiplies only its
    expert's weights, read in place (gemv.expert_gemv). scales: the per-row scales of int8
    weights (quantize.py), applied to the outputs."""
    N, top_k = experts.shape
    expert = experts.flatten()  # (N * top_k,): the expert of each (token, slot) pair
    xs = computed_once(x).repeat_interleave(top_k, dim=0)  # (N * top_k, dim): each pair's token
    s1, s3, s2 = scales
    h = F.silu(expert_gemv(xs, w1, expert, s1)) * expert_gemv(xs, w3, expert, s3)  # (N * top_k, ffn_dim)
    y = expert_gemv(h, w2, expert, s2).view(N, top_k, -1)  # each chosen expert's output
    return (y * weights[..., None].to(y.dtype)).sum(1)


def moe_one_token(x, weights, experts, w1, w3, w2):
    """Same as moe.moe_reference for one token, x (1, dim): its top_k experts, one after another."""
    y = torch.zeros_like(x)
    for w, e in zip(weights[0].to(x.dtype), experts[0].tolist()):
        y += w * expert_ffn(x, w1[e], w3[e], w2[e])
    return y


def computed_once(x):
    """x (a view of all of it). A compiled graph computes a view's base into memory, once; a
    loop that reads x many times (gemv_fused's, once per output row) then loads it, instead of
    recomputing whatever produced x (a norm: a square root, products, casts) each time."""
    return x.as_strided(x.shape, x.stride())


def gemv_fused(x, w, scale=None):
    """x (..., in) @ w (out, in).T, times scale (out,) if given, in x's dtype: for a few rows
    in a compiled step (module docstring), where it compiles to one loop reading w once."""
    y = (computed_once(x.float())[..., None, :] * w.float()).sum(-1)
    return (y if scale is None else y * scale.float()).to(x.dtype)


def fuses_gemv(x: torch.Tensor) -> bool:
    """Whether gemv_fused beats F.linear for x @ w.T: a few rows, no gradients, compiled, on
    the CPU (module docstring)."""
    few = x.numel() <= DECODE_TOKENS * x.shape[-1] and not torch.is_grad_enabled()
    return few and x.device.type == "cpu" and torch.compiler.is_compiling()


class FastLinear(nn.Module):
    """A bias-free nn.Linear's weight, multiplied by gemv_fused where that is faster."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # the same Parameter, not a copy

    def forward(self, x):
        return gemv_fused(x, self.weight) if fuses_gemv(x) else F.linear(x, self.weight)


class FastExperts(nn.Module):
    """moe.Experts' parameters, multiplied by the way that suits the call (module docstring)."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.w1, self.w3, self.w2 = experts.w1, experts.w3, experts.w2  # the same Parameters, not copies

    def forward(self, x, weights, experts):
        """Experts.forward's result: x (N, dim), weights, experts (N, top_k) -> (N, dim)."""
        decoding = len(x) <= DECODE_TOKENS and not torch.is_grad_enabled()
        if decoding and (x.is_cuda or torch.compiler.is_compiling()):
            return moe_gathered(x, weights, experts, self.w1, self.w3, self.w2)
        if len(x) == 1:
            return moe_one_token(x, weights, experts, self.w1, self.w3, self.w2)
        dtype = grouped_mm_dtype(x, self.w1.shape[1], torch.compiler.is_compiling())
        if dtype is None:  # one matmul per expert, in Python: the host waits for the block sizes
            return moe_grouped(x, weights, experts, self.w1, self.w3, self.w2)
        return moe_grouped_mm(x, weights, experts, self.w1, self.w3, self.w2, dtype)


def accelerate(model):
    """Swap every MoE layer's plain experts for FastExperts, in place, and return the model.
    The parameters stay the same tensors: an optimizer or a checkpoint sees no difference.
    Other experts (already fast, or int8: quantize.py) are left as they are."""
    for block in model.layers:
        if type(block.moe.experts) is Experts:
            block.moe.experts = FastExperts(block.moe.experts)
    return model


def accelerate_linears(model):
    """Swap every bias-free nn.Linear of `model` for FastLinear, in place, and return the model.
    The weights stay the same tensors. int8 ones (quantize.Int8Linear) already compute this way."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear and child.bias is None:
                setattr(module, name, FastLinear(child))
    return model
