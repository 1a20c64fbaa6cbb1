"""Figures of one training run (train.py's log.jsonl): loss.png and expert_load.png."""

import math
from pathlib import Path

from .routing import draw_load, share_colorbar, share_norm
from .runs import expert_shares
from .style import pyplot


def plot_expert_load(out: Path, train: list[dict]):
    """Each layer's expert shares over training as a heatmap, white at perfect balance; beside
    it the busiest and the idlest expert of each layer."""
    plt = pyplot()
    steps, shares = expert_shares(train)
    n_layers, n_experts = shares.shape[1:]
    fig, (a, b) = plt.subplots(
        1,
        2,
        figsize=(10, 0.17 * n_layers * n_experts + 1.8),
        layout="constrained",
        gridspec_kw={"width_ratios": [1.3, 1]},
    )
    im = draw_load(a, steps, shares, share_norm(n_experts), "each expert's share of its layer's slots")
    share_colorbar(fig, im, a, n_experts, "share of the layer's routed slots")
    for layer in range(n_layers):
        b.plot(
            steps.numpy(), shares[:, layer].max(-1).values.numpy(), color=f"C{layer}", lw=1.2, label=f"layer {layer}"
        )
        b.plot(steps.numpy(), shares[:, layer].min(-1).values.numpy(), color=f"C{layer}", lw=1.2, ls="--")
    b.axhline(1 / n_experts, color="gray", lw=0.8, ls=":")
    b.text(steps[-1].item(), 1 / n_experts, f"1/{n_experts}: perfect balance", ha="right", va="bottom", color="gray")
    b.set(xlabel="step", title="share of the busiest (solid) and\nthe idlest (dashed) expert", ylim=(0, None))
    b.legend(ncol=2)
    fig.suptitle("Expert load over the demo run")
    fig.savefig(out)
    plt.close(fig)


def plot_loss(out: Path, train: list[dict], evals: list[dict], config: dict | None = None):
    """Training loss with validation loss, the load-balancing loss, and the learning rate.
    With the run's config: reference lines at ln(vocab_size) (a uniform guess) and top_k (balanced aux loss)."""
    plt = pyplot()
    step = [r["step"] for r in train]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(10, 3.6), layout="constrained")
    a.plot(step, [r["loss"] for r in train], lw=1.0, label="train")
    if evals:
        a.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    if config:
        uniform = math.log(config["vocab_size"])
        a.axhline(uniform, color="gray", lw=0.8, ls="--")
        a.text(
            step[-1],
            uniform + 0.05,
            f"ln {config['vocab_size']} = {uniform:.2f}",
            ha="right",
            va="bottom",
            color="gray",
        )
        a.set_ylim(top=uniform + 0.6)
    a.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    a.legend(loc="upper right", bbox_to_anchor=(1.0, 0.85))
    b.plot(step, [r["aux_loss"] for r in train], lw=1.0, color="C2")
    if config:
        b.axhline(config["top_k"], color="gray", lw=0.8, ls="--")
        b.text(step[-1], config["top_k"] - 0.01, f"{config['top_k']} = top_k: even", ha="right", va="top", color="gray")
        b.set_ylim(config["top_k"] - 0.1, None)
    b.set(xlabel="step", ylabel="aux loss (mean over layers)", title="load-balancing loss")
    c.plot(step, [r["lr"] for r in train], color="C3")
    c.set(xlabel="step", ylabel="learning rate", title="learning rate")
    c.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.savefig(out)
    plt.close(fig)
