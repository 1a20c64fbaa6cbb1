"""dispatch.png: how a batch of tokens reaches its experts, computed as docs/05_moe.md's worked
example does (six tokens through layer 0 of the fixture orion-mini-rmsnorm, top-2)."""

from pathlib import Path

import torch

import nano_orion
from nano_orion.moe import expert_counts, route

from .runs import ROOT
from .style import arrow, box, canvas, pyplot


@torch.no_grad()
def dispatch_example(n_tokens: int = 6, seed: int = 0):
    """The worked example's routing: -> dict of experts, weights (n_tokens, top_k) and the
    sorted dispatch: order, token (n_tokens * top_k,), counts, ends (n_experts,)."""
    model, _ = nano_orion.load(ROOT / "tests/fixtures/orion-mini-rmsnorm")
    layer, cfg = model.layers[0].moe, model.config
    torch.manual_seed(seed)
    x = torch.randn(n_tokens, cfg.dim)
    _, weights, experts = route(layer.router(x), cfg.top_k)
    order = experts.flatten().argsort(stable=True)
    counts = expert_counts(experts, cfg.n_experts)
    return {
        "experts": experts,
        "weights": weights,
        "order": order,
        "token": order // cfg.top_k,
        "counts": counts,
        "ends": counts.cumsum(0),
    }


def plot_dispatch(out: Path):
    """Left: each token's two experts. Middle: the (token, slot) pairs sorted by expert, one
    block per expert, ending where `ends` says. Right: each output row weighted and added back
    to its token (index_add)."""
    plt = pyplot()
    d = dispatch_example()
    experts, weights, order, token, ends = d["experts"], d["weights"], d["order"], d["token"], d["ends"]
    n_tokens, top_k = experts.shape
    n_pairs, n_experts = len(order), len(ends)
    colors = [plt.get_cmap("tab10")(e % 10) for e in range(n_experts)]
    fig, ax = plt.subplots(figsize=(10, 6.6))
    canvas(ax, (-0.2, 10.2), (-1.2, n_pairs + 1.6))
    ax.set_aspect("auto")

    def y_pair(i):
        return n_pairs - 1 - i  # sorted pair i, top to bottom

    def y_token(t):
        return n_pairs - 1 - (t + 0.5) * n_pairs / n_tokens + 0.5

    ax.text(1.1, n_pairs + 0.9, "tokens and their top-2\n(experts, weights)", ha="center", va="center")
    ax.text(5.0, n_pairs + 0.9, "pairs sorted by expert\n(order, token)", ha="center", va="center")
    ax.text(8.9, n_pairs + 0.9, "outputs, summed per token\n(index_add)", ha="center", va="center")
    for t in range(n_tokens):
        label = ", ".join(f"{e}: {w:.2f}" for e, w in zip(experts[t].tolist(), weights[t].tolist()))
        box(ax, 1.1, y_token(t), 2.0, 0.9, f"token {t}\n{label}", "#f2f2f2")
        box(ax, 8.9, y_token(t), 1.6, 0.9, f"y[{t}]", "#e1d5e7")
    start, empty = 0, []
    for e, end in enumerate(ends.tolist()):
        if end == start:  # an expert no token chose: an empty block
            empty.append(f"expert {e} (ends[{e}] = {end})")
            continue
        ax.plot(
            [6.15, 6.15], [y_pair(start) + 0.42, y_pair(end - 1) - 0.42], color=colors[e], lw=4, solid_capstyle="butt"
        )
        ax.text(
            3.85,
            (y_pair(start) + y_pair(end - 1)) / 2,
            f"E{e}",
            ha="right",
            va="center",
            color=colors[e],
            weight="bold",
        )
        start = end
    for i in range(n_pairs):
        pair, t = order[i].item(), token[i].item()
        slot = pair % top_k
        e, w = experts[t, slot].item(), weights[t, slot].item()
        box(ax, 5.0, y_pair(i), 2.1, 0.78, f"row {i}: token {t} (pair {pair})", colors[e], fontsize=9, alpha=0.35)
        ax.plot([2.1, 3.95], [y_token(t), y_pair(i)], color="#aaaaaa", lw=0.7)
        ax.text(6.3, y_pair(i), f"×{w:.2f}", va="center", fontsize=9, color=colors[e])
        arrow(ax, (6.85, y_pair(i)), (8.1, y_token(t)), color=colors[e], lw=0.9)
    ax.text(
        5.0,
        -0.75,
        "ends = " + str(ends.tolist()) + ("; empty blocks: " + ", ".join(empty) if empty else ""),
        ha="center",
        va="center",
        fontsize=9,
    )
    fig.suptitle(
        f"Dropless dispatch of {n_tokens} tokens, top-{top_k} of {n_experts} experts: sort the {n_pairs} pairs "
        "by expert,\nmultiply each block by its expert, weight each row and add it back to its token"
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
