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
and is obviously right; `moe_grouped` (what the model uses) sorts the (token, expert) pairs
by expert so that each expert does one matmul over a contiguous block. Two serve decoding,
where per-step overhead counts: `moe_one_token` runs a single token's top_k experts
directly (batch-1 decode, no sorting or scattering), and `moe_gathered` gathers each
token's experts' weights, which has no data-dependent shapes, so torch.compile can fuse a
one-token decode step into kernels that read the weights in place.
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
    flat_experts = experts.flatten()  # (N * top_k,): the expert of each (token, slot)
    order = flat_experts.argsort(stable=True)  # slots sorted by expert
    token = order // top_k  # the token of each sorted slot
    counts = flat_experts.bincount(minlength=w1.shape[0]).tolist()  # slots per expert
    blocks = x[token].split(counts)  # block e: the tokens routed to expert e, (counts[e], dim)
    # unbind, not w1[e]: in backward each w1[e] would add a full-size zero-padded gradient to w1
    experts_w = zip(w1.unbind(0), w3.unbind(0), w2.unbind(0))
    y_sorted = torch.cat([expert_ffn(xe, *w) for xe, w in zip(blocks, experts_w) if len(xe)])
    y_sorted = (y_sorted * weights.flatten()[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y_sorted)  # sum each token's top_k outputs


def moe_one_token(x, weights, experts, w1, w3, w2):
    """Same as moe_reference for one token, x (1, dim): its top_k experts, one after another."""
    y = torch.zeros_like(x)
    for w, e in zip(weights[0].to(x.dtype), experts[0].tolist()):
        y += w * expert_ffn(x, w1[e], w3[e], w2[e])
    return y


def moe_gathered(x, weights, experts, w1, w3, w2):
    """Same as moe_reference, meant for a few tokens under torch.compile: index the stacked
    weights by each token's experts, (N, top_k, ffn_dim, dim), and contract. Run eagerly,
    the indexing copies the chosen experts' weights; compiled, it is fused into the matmuls."""
    h = F.silu(torch.einsum("nd,nkfd->nkf", x, w1[experts])) * torch.einsum("nd,nkfd->nkf", x, w3[experts])
    y = torch.einsum("nkf,nkdf->nkd", h, w2[experts])  # (N, top_k, dim): each chosen expert's output
    return torch.einsum("nkd,nk->nd", y, weights.to(x.dtype))


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """n_experts * sum_e f_e * P_e for one layer; probs (N, n_experts), experts (N, top_k)."""
    N, n_experts = probs.shape
    f = experts.flatten().bincount(minlength=n_experts).float() / N  # tokens per expert, sums to top_k
    P = probs.mean(dim=0)  # mean router probability per expert: the part gradients flow through
    return n_experts * (f * P).sum()


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

    def forward(self, x):
        """x (B, T, dim) -> y (B, T, dim), plus the router's probs (B*T, n_experts) and
        chosen experts (B*T, top_k) for the load-balancing loss and for inspection."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        probs, weights, experts = route(self.router(x), self.top_k)
        if T == 1 and torch.compiler.is_compiling():  # a compiled decode step (module docstring)
            moe = moe_gathered
        else:
            moe = moe_one_token if B * T == 1 else moe_grouped
        y = moe(x, weights, experts, self.w1, self.w3, self.w2)
        return y.view(B, T, D), probs, experts
