"""The sparse mixture-of-experts (MoE) feed-forward layer.

A dense transformer sends every token through one big feed-forward network. An MoE layer
holds `n_experts` smaller ones (Orion: 8) and a *router* that picks `top_k` of them per
token (Orion: 2). Parameters grow 8x; the work per token only 2x.

For each token x (dim numbers):

    probs   = softmax(router(x))            # (n_experts,), in float32
    w, e    = topk(probs, top_k)            # the chosen experts and their probabilities
    w       = w / sum(w)                    # renormalise over the chosen ones
    y       = sum_j w_j * expert_{e_j}(x)
    expert(x) = w2 (silu(w1 x) * (w3 x))    # SwiGLU: w1 "gate", w3 "up", w2 "down"

Dropless: every token reaches its experts, however unevenly they are chosen (no capacity
limit, no dropped tokens).

Training needs a push towards balance, or the router collapses onto a few experts. The
auxiliary load-balancing loss (Switch Transformer, as in Mixtral) is

    n_experts * sum_e f_e * P_e,

f_e the fraction of tokens routed to expert e, P_e the mean router probability of e. It
equals top_k when routing is perfectly even and grows as it concentrates.

Ways to run the experts, all computing the same thing: `moe_reference` loops over experts
and is obviously right. `moe_grouped` serves many tokens (training, prompts): it sorts the
(token, expert) pairs by expert, so that each expert's tokens form one block, and one
grouped matmul (F.grouped_mm) multiplies every block by its expert, all on the device.
Two serve decoding, a token or a few at a time, where reading the weights is the cost:
`moe_gathered` multiplies each (token, expert) pair by just that expert's weights, read in
place (gemv.py; on a GPU, without asking the host which experts were chosen), and
`moe_one_token` runs a single token's experts one after another (the CPU's eager path).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import OrionConfig
from .gemv import expert_gemv

DECODE_TOKENS = 8  # up to this many tokens (and no gradients), decoding's paths serve


def route(router_logits: torch.Tensor, top_k: int):
    """router_logits (N, n_experts) -> probs (N, n_experts), weights (N, top_k), experts (N, top_k)."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many (token, slot) pairs chose each expert: (n_experts,) int32, computed on the
    device (torch.bincount would ask the host for the largest id first)."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.int32, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def expert_ffn(x, w1, w3, w2):
    """One SwiGLU expert: x (n, dim), w1, w3 (ffn_dim, dim), w2 (dim, ffn_dim) -> (n, dim)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def moe_reference(x, weights, experts, w1, w3, w2):
    """Mixture output, one expert at a time. x (N, dim); weights, experts (N, top_k);
    w1, w3 (n_experts, ffn_dim, dim); w2 (n_experts, dim, ffn_dim)."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(experts == e)  # the tokens that chose e, and in which of their top_k slots
        y[token] += weights[token, slot, None].to(x.dtype) * expert_ffn(x[token], w1[e], w3[e], w2[e])
    return y


def moe_grouped(x, weights, experts, w1, w3, w2):
    """Same as moe_reference, with the tokens of each expert gathered into one block."""
    N, top_k = experts.shape
    order = experts.flatten().argsort(stable=True)  # (token, slot) pairs sorted by expert
    token = order // top_k  # the token of each sorted pair
    xs = x[token]  # (N * top_k, dim): block e holds the tokens routed to expert e
    counts = expert_counts(experts, w1.shape[0])  # block sizes
    dtype = compute_dtype(x)
    if grouped_mm_runs(x.device, dtype, x.shape[1], w1.shape[1], torch.compiler.is_compiling()):
        ends = counts.cumsum(0, dtype=torch.int32)  # where each block ends
        xs, w1, w3, w2 = (t.to(dtype) for t in (xs, w1, w3, w2))  # grouped_mm is not autocast's

        def grouped(a, w):  # a's block e times w[e]^T, every block in one kernel
            return F.grouped_mm(a, w.transpose(-2, -1), offs=ends)

        y = grouped(F.silu(grouped(xs, w1)) * grouped(xs, w3), w2)
    else:  # one matmul per expert, in Python: the host waits for the block sizes
        # unbind, not w1[e]: in backward each w1[e] would add a full-size zero-padded gradient to w1
        experts_w = zip(w1.unbind(0), w3.unbind(0), w2.unbind(0))
        y = torch.cat([expert_ffn(xe, *w) for xe, w in zip(xs.split(counts.tolist()), experts_w) if len(xe)])
    y = (y * weights.flatten()[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)  # sum each token's top_k outputs


def moe_gathered(x, weights, experts, w1, w3, w2, scales=(None, None, None)):
    """Same as moe_reference for a few tokens: each (token, slot) pair multiplies only its
    expert's weights, read in place (gemv.expert_gemv). scales: the per-row scales of int8
    weights (quantize.py), applied to the outputs."""
    N, top_k = experts.shape
    expert = experts.flatten()  # (N * top_k,): the expert of each (token, slot) pair
    xs = x.repeat_interleave(top_k, dim=0)  # (N * top_k, dim): each pair's token
    s1, s3, s2 = scales
    h = F.silu(expert_gemv(xs, w1, expert, s1)) * expert_gemv(xs, w3, expert, s3)  # (N * top_k, ffn_dim)
    y = expert_gemv(h, w2, expert, s2).view(N, top_k, -1)  # each chosen expert's output
    return (y * weights[..., None].to(y.dtype)).sum(1)


def moe_one_token(x, weights, experts, w1, w3, w2):
    """Same as moe_reference for one token, x (1, dim): its top_k experts, one after another."""
    y = torch.zeros_like(x)
    for w, e in zip(weights[0].to(x.dtype), experts[0].tolist()):
        y += w * expert_ffn(x, w1[e], w3[e], w2[e])
    return y


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """n_experts * sum_e f_e * P_e for one layer; probs (N, n_experts), experts (N, top_k)."""
    N, n_experts = probs.shape
    f = expert_counts(experts, n_experts).float() / N  # tokens per expert, sums to top_k
    P = probs.mean(dim=0)  # mean router probability per expert: the part gradients flow through
    return n_experts * (f * P).sum()


# ---- which kernels this machine has --------------------------------------------------------


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's, where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm_runs(device: torch.device, dtype: torch.dtype, dim: int, ffn_dim: int, compiling: bool) -> bool:
    """Whether F.grouped_mm runs here: on CUDA from torch 2.9 in bfloat16 on sm80 and later,
    on the CPU from torch 2.13 (there, under torch.compile, in bfloat16 only); in bfloat16
    the rows must be a multiple of 16 bytes long."""
    if not hasattr(F, "grouped_mm") or (dtype == torch.bfloat16 and (dim % 8 or ffn_dim % 8)):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    new_enough = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)
    return device.type == "cpu" and new_enough and (dtype == torch.bfloat16 or not compiling)


class MoE(nn.Module):
    def __init__(self, config: OrionConfig):
        super().__init__()
        self.top_k = config.top_k
        E, D, F_ = config.n_experts, config.dim, config.ffn_dim
        self.router = nn.Linear(D, E, bias=False)
        # The experts' weights, stacked: expert e is w1[e], w3[e], w2[e].
        self.w1 = nn.Parameter(torch.empty(E, F_, D))  # gate projection
        self.w3 = nn.Parameter(torch.empty(E, F_, D))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, D, F_))  # down projection
        self.routing = None  # (probs, experts) of the last forward pass

    def forward(self, x):
        """x (B, T, dim) -> y (B, T, dim). The routing is kept in self.routing: the router's
        probs (B*T, n_experts) and the chosen experts (B*T, top_k), for the load-balancing
        loss and for inspection (Orion.routing gathers every layer's). In a compiled decoding
        step replayed as a CUDA graph they live in the graph's memory, which the next step
        overwrites: read them before it, or clone them."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        probs, weights, experts = route(self.router(x), self.top_k)
        self.routing = (probs, experts)
        return self.mix(x, weights, experts).reshape(B, T, D)

    def mix(self, x, weights, experts):
        """sum_j weights[:, j] * expert_{experts[:, j]}(x), by the way that suits the work
        (module docstring): x (N, dim) -> (N, dim)."""
        decoding = len(x) <= DECODE_TOKENS and not torch.is_grad_enabled()
        if decoding and (x.is_cuda or torch.compiler.is_compiling()):
            return moe_gathered(x, weights, experts, self.w1, self.w3, self.w2)
        if len(x) == 1:
            return moe_one_token(x, weights, experts, self.w1, self.w3, self.w2)
        return moe_grouped(x, weights, experts, self.w1, self.w3, self.w2)
