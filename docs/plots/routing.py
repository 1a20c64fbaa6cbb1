"""Figures of the router: router.png (what it does with one sentence in four languages) and
the expert-load heatmaps of collapse.png and expert_load.png, on one colour scale."""

from pathlib import Path

import torch

from .runs import byte_groups, expert_shares
from .style import printable, pyplot

RUN_COLORS = {"with": "C0", "without": "C3"}  # the demo run and the run without the balancing loss


def share_norm(n_experts: int):
    """A linear colour scale for shares and probabilities, white at 1 / n_experts (no
    preference), from 0 (darkest blue) to 2 / n_experts (darkest red); larger values are drawn
    as the darkest red, and the colour bar ends in an arrow that says so."""
    from matplotlib.colors import Normalize

    return Normalize(vmin=0.0, vmax=2 / n_experts)


def share_colorbar(fig, im, ax, n_experts, label):
    bar = fig.colorbar(
        im,
        ax=ax,
        extend="max",
        ticks=[0, 0.5 / n_experts, 1 / n_experts, 1.5 / n_experts, 2 / n_experts],
        fraction=0.04,
        pad=0.02,
    )
    bar.ax.set_yticklabels(
        [
            "0",
            f"{0.5 / n_experts:.3f}",
            f"1/{n_experts} = {1 / n_experts:.3f}",
            f"{1.5 / n_experts:.3f}",
            f"≥ {2 / n_experts:.3f}",
        ]
    )
    bar.set_label(label)
    return bar


def plot_router(out: Path, routing: dict, layers=None):
    """Router probabilities (colour) and the top_k chosen experts (dots) for each token of the
    recorded sentences (runs.record_routing), in the first and the last layer. Byte-fallback
    tokens are bracketed by the character they spell."""
    plt = pyplot()
    sentences = routing["sentences"]
    n_experts, top_k = routing["n_experts"], routing["top_k"]
    n_layers = len(next(iter(sentences.values()))["layers"])
    layers = sorted({0, n_layers - 1}) if layers is None else layers
    norm = share_norm(n_experts)
    rows = [(lang, layer) for lang in sentences for layer in layers]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.75 * len(rows) + 1.5), layout="constrained", squeeze=False)
    for ax, (lang, layer) in zip(axes[:, 0], rows):
        pieces = sentences[lang]["pieces"]
        probs, experts = sentences[lang]["layers"][layer]
        im = ax.imshow(probs.T.numpy(), aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        t = torch.arange(len(pieces)).repeat_interleave(experts.shape[1])
        ax.scatter(t.numpy(), experts.flatten().numpy(), s=16, c="black", marker="o", label=f"chosen (top-{top_k})")
        ax.set_yticks(range(n_experts), [str(e) if e % 2 == 0 else "" for e in range(n_experts)])
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_ylim(n_experts - 0.5, -0.5)
        last_of_sentence = layer == layers[-1]
        if last_of_sentence:  # token labels under the sentence's last panel only
            ax.set_xticks(range(len(pieces)), [printable(p) for p in pieces], rotation=90, fontsize=8)
        else:
            ax.set_xticks(range(len(pieces)), [""] * len(pieces))
            ax.set_title(
                f"{lang}: {printable(sentences[lang]['text'])}", loc="left", pad=22 if byte_groups(pieces) else 6
            )
            for first, last, ch in byte_groups(pieces):  # a bracket above the bytes of one character
                ax.plot(
                    [first - 0.4, first - 0.4, last + 0.4, last + 0.4],
                    [-0.75, -0.95, -0.95, -0.75],
                    color="black",
                    lw=0.8,
                    clip_on=False,
                )
                ax.text((first + last) / 2, -1.05, printable(ch), ha="center", va="bottom", clip_on=False)
    axes[0, 0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.02), framealpha=0.9)
    share_colorbar(fig, im, axes[:, 0], n_experts, f"router probability (white: 1/{n_experts}, no preference)")
    fig.suptitle(
        f"Routing in the {routing['checkpoint']} model: {n_layers} layers, {n_experts} experts, top-{top_k}\n"
        "one sentence in four languages; byte tokens bracketed by the character they spell"
    )
    fig.savefig(out)
    plt.close(fig)


def draw_load(ax, steps, shares, norm, title):
    """Heatmap of one run's expert shares: a row per (layer, expert), a column per logged step."""
    S, n_layers, n_experts = shares.shape
    data = shares.permute(1, 2, 0).reshape(n_layers * n_experts, S).numpy()
    width = (steps[1] - steps[0]).item() if S > 1 else 1
    extent = (steps[0].item() - width / 2, steps[-1].item() + width / 2, n_layers * n_experts - 0.5, -0.5)
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest", extent=extent)
    for layer in range(1, n_layers):
        ax.axhline(layer * n_experts - 0.5, color="black", lw=1.2)
    ax.set_yticks(range(n_layers * n_experts), [str(e) for _ in range(n_layers) for e in range(n_experts)], fontsize=8)
    for layer in range(n_layers):  # the layer of each group of rows, left of the expert numbers
        ax.text(
            -0.09,
            layer * n_experts + (n_experts - 1) / 2,
            f"layer {layer}",
            transform=ax.get_yaxis_transform(),
            rotation=90,
            ha="center",
            va="center",
        )
    ax.set(xlabel="step", title=title)
    return im


def plot_collapse(
    out: Path,
    balanced: list[dict],
    unbalanced: list[dict],
    top_k: int | None = None,
    evals: tuple[list[dict], list[dict]] = ((), ()),
):
    """Expert load of two runs side by side (with and without the load-balancing loss) on one
    colour scale centred on 1/n_experts; below, the aux loss each measured (logged also at
    coefficient 0) and their validation losses, one colour per run."""
    plt = pyplot()
    (s1, sh1), (s2, sh2) = expert_shares(balanced), expert_shares(unbalanced)
    n_layers, n_experts = sh1.shape[1:]
    if sh2.shape[1:] != sh1.shape[1:]:
        raise ValueError(
            f"the two runs have different shapes: {tuple(sh1.shape[1:])} and {tuple(sh2.shape[1:])} (layers, experts)"
        )
    fig = plt.figure(figsize=(10, 0.2 * n_layers * n_experts + 4.6), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[0.2 * n_layers * n_experts, 2.6])
    a, b = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    c, d = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    norm = share_norm(n_experts)
    draw_load(a, s1, sh1, norm, "with the load-balancing loss (0.01)")
    im = draw_load(b, s2, sh2, norm, "without it (router_aux_loss_coef 0)")
    b.set_yticklabels([])
    for text in b.texts:  # the layer labels once, left of the first panel
        text.remove()
    share_colorbar(fig, im, [a, b], n_experts, "share of the layer's routed slots")
    runs = ((balanced, s1, evals[0], "with"), (unbalanced, s2, evals[1], "without"))
    for records, steps, ev, name in runs:
        color = RUN_COLORS[name]
        c.plot(steps.numpy(), [r["aux_loss"] for r in records], color=color, lw=1.2, label=f"{name} the loss")
        if ev:
            d.plot(
                [r["step"] for r in ev],
                [r["val_loss"] for r in ev],
                color=color,
                marker="o",
                lw=1.2,
                label=f"{name}: " + ", ".join(f"{r['val_loss']:.3f}" for r in ev),
            )
    if top_k:
        c.axhline(top_k, color="gray", lw=0.8, ls=":")
        c.text(
            max(s1[-1], s2[-1]).item(),
            top_k - 0.04,
            f"{top_k} = top_k: even routing",
            ha="right",
            va="top",
            color="gray",
        )
        c.set_ylim(top_k - 0.3, None)
    c.set(xlabel="step", ylabel="aux loss (mean over layers)", title="aux loss (measured in both runs)")
    c.legend(loc="center right")
    d.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation loss")
    d.legend()
    fig.suptitle("Expert load with and without the load-balancing loss: the same toy run, seed and data")
    fig.savefig(out)
    plt.close(fig)
