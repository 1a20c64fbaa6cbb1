"""Figures of walkthrough 11, from the committed runs: experiments.png (validation loss against
training compute, dense against MoE) and specialisation.png (which experts each kind of token
is sent to)."""

from pathlib import Path

import torch

from nano_orion import OrionConfig

from .routing import share_colorbar, share_norm
from .runs import RUNS, read_run
from .style import pyplot

# The runs of scripts/experiments.py, as the figure and walkthrough 11 name them, with a style each.
EXPERIMENTS = {
    "dense-active": ("dense, the MoE's active size (ffn 512)", "C0", "--", "s"),
    "dense-total": ("dense, the MoE's total size (ffn 2048)", "C1", "--", "s"),
    "moe-8x256-top2": ("MoE 8 × 256, top-2 (the demo)", "C3", "-", "o"),
    "moe-8x512-top1": ("MoE 8 × 512, top-1", "C4", "-", "o"),
    "moe-4x256-top2": ("MoE 4 × 256, top-2", "C2", "-", "o"),
    "moe-16x256-top2": ("MoE 16 × 256, top-2", "C5", "-", "o"),
}


def compute_curve(name: str, runs: Path = RUNS / "experiments"):
    """-> (training FLOPs at each evaluation, validation losses, the run's OrionConfig).
    FLOPs: 6 per active parameter per token (forward 2, backward 4), as train.py's MFU counts."""
    train, evals, config = read_run(name, runs)
    config = OrionConfig.from_dict(config)
    tokens = {r["step"]: r["tokens"] for r in train}
    flops = [6 * config.n_active_params() * tokens[r["step"]] for r in evals]
    return flops, [r["val_loss"] for r in evals], config


def plot_experiments(out: Path, runs: Path = RUNS / "experiments"):
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained", gridspec_kw={"width_ratios": [1.3, 1]})
    finals = []
    for name, (label, color, style, marker) in EXPERIMENTS.items():
        if not (runs / name / "log.jsonl").is_file():
            continue
        flops, losses, config = compute_curve(name, runs)
        a.plot([f / 1e12 for f in flops], losses, style, marker=marker, color=color, label=label, lw=1.2, ms=4)
        finals.append((label, color, losses[-1], config))
    a.set(
        xlabel="training compute (TFLOPs: 6 × active parameters × tokens)",
        ylabel="validation loss (nats/token)",
        title="validation loss against compute, every 50 steps",
    )
    a.set_xscale("log")
    a.legend(fontsize=8.5)
    for y, (label, color, loss, config) in enumerate(finals):
        b.barh(y, loss, color=color)
        b.text(loss + 0.01, y, f"{loss:.3f}", va="center")
    b.set_yticks(
        range(len(finals)),
        [
            f"{label.split(' (')[0]}\n{config.n_active_params() / 1e6:.2f} M active, "
            f"{config.n_params() / 1e6:.2f} M in all"
            for label, _, _, config in finals
        ],
        fontsize=8.5,
    )
    low = min(loss for _, _, loss, _ in finals)
    b.set(xlim=(low - 0.1, low + 0.4), xlabel="validation loss at step 300", title="after 300 steps")
    b.invert_yaxis()
    fig.suptitle(
        "What the experts buy: the toy model with dense and MoE feed-forward layers, 300 steps of the demo's data"
    )
    fig.savefig(out)
    plt.close(fig)


def plot_specialisation(out: Path, record: dict):
    """Per layer, a row per kind of token, a column per expert: the share of that kind's routed
    slots each expert receives (rows sum to 1; white at 1/n_experts, no preference)."""
    plt = pyplot()
    slots = torch.tensor(record["slots"], dtype=torch.float64)  # (layers, kinds, experts)
    shares = slots / slots.sum(-1, keepdim=True)
    n_layers, n_kinds, n_experts = shares.shape
    labels = [f"{kind} ({n:,})" for kind, n in zip(record["kinds"], record["tokens"])]
    fig, axes = plt.subplots(2, (n_layers + 1) // 2, figsize=(10, 6.8), layout="constrained", squeeze=False)
    norm = share_norm(n_experts)
    for layer, ax in enumerate(axes.flat):
        im = ax.imshow(shares[layer].numpy(), cmap="RdBu_r", norm=norm, interpolation="nearest", aspect="auto")
        for k in range(n_kinds):
            for e in range(n_experts):
                value = shares[layer, k, e].item()
                dark = abs(norm(value) - 0.5) > 0.3  # the ends of the colour scale: white text
                ax.text(
                    e,
                    k,
                    f"{value:.2f}".lstrip("0"),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(n_kinds), labels if layer % axes.shape[1] == 0 else [""] * n_kinds)
        ax.set(title=f"layer {layer}", xlabel="expert")
    share_colorbar(fig, im, axes, n_experts, "share of the kind's routed slots")
    fig.suptitle(
        f"Which experts each kind of token goes to: the {record['checkpoint']} model on {record['text']}\n"
        "(kinds from Python's tokenize; in brackets, the number of tokens of each kind)"
    )
    fig.savefig(out)
    plt.close(fig)
