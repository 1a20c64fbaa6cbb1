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

The mixture by its definition, one expert at a time, is `moe_reference`. The `Experts`
module computes the same thing grouped, which is what makes it fast for many tokens: it
sorts the (token, slot) pairs by expert, so that each expert's tokens form one block,
multiplies each block by its expert, and adds each output, weighted, back to its token.
Other ways to run the same experts, each faster on some hardware (one grouped matmul for
all blocks, reading only the chosen experts' weights when decoding, int8 weights), are
not part of this lesson: fast.py and quantize.py swap them in for `MoE.experts`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import OrionConfig


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
    return torch.zeros(n_experts, dtype=torch.int32, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )


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
    counts = experts.flatten().bincount(minlength=w1.shape[0])  # block sizes
    ends = counts.cumsum(0).tolist()  # where each block ends, on the host: the loop below needs them
    blocks, start = [], 0
    # unbind, not w1[e]: in backward each w1[e] would add a full-size zero-padded gradient to w1
    for end, w1_e, w3_e, w2_e in zip(ends, w1.unbind(0), w3.unbind(0), w2.unbind(0)):
        if end > start:  # expert e multiplies its block
            blocks.append(expert_ffn(xs[start:end], w1_e, w3_e, w2_e))
        start = end
    y = (torch.cat(blocks) * weights.flatten()[order, None]).to(x.dtype)  # each pair's output, weighted
    return torch.zeros_like(x).index_add_(0, token, y)  # sum each token's top_k outputs


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """n_experts * sum_e f_e * P_e for one layer; probs (N, n_experts), experts (N, top_k)."""
    N, n_experts = probs.shape
    f = expert_counts(experts, n_experts).float() / N  # tokens per expert, sums to top_k
    P = probs.mean(dim=0)  # mean router probability per expert: the part gradients flow through
    return n_experts * (f * P).sum()


class Experts(nn.Module):
    """n_experts SwiGLU feed-forward networks, their weights stacked: expert e is w1[e], w3[e], w2[e]."""

    def __init__(self, n_experts: int, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))  # gate projection
        self.w3 = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))  # up projection
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))  # down projection

    def forward(self, x, weights, experts):
        """sum_j weights[:, j] * expert_{experts[:, j]}(x): x (N, dim), weights, experts (N, top_k) -> (N, dim)."""
        return moe_grouped(x, weights, experts, self.w1, self.w3, self.w2)


class MoE(nn.Module):
    """A router and the experts it chooses from."""

    def __init__(self, config: OrionConfig):
        super().__init__()
        self.top_k = config.top_k
        self.experts = Experts(
            config.n_experts, config.dim, config.ffn_dim
        )  # first: init_weights draws it before the router
        self.router = nn.Linear(config.dim, config.n_experts, bias=False)
        self.routing = None  # (probs, experts) of the last forward pass

    def forward(self, x):
        """x (B, T, dim) -> y (B, T, dim). The routing is kept in self.routing: the router's
        probs (B*T, n_experts) and the chosen experts (B*T, top_k), for the load-balancing
        loss and for inspection (Orion.routing gathers every layer's). After a compiled
        decoding step they may live in memory the next step overwrites: read them before it,
        or clone them (docs/10_fast_decoding.md)."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        probs, weights, experts = route(self.router(x), self.top_k)
        self.routing = (probs, experts)
        return self.experts(x, weights, experts).reshape(B, T, D)
