"""Diagrams of the architecture, computed from nano_orion's own code: moe_block.png, gqa.png,
kv_cache.png, rope_angles.png, attention_masks.png."""

import math
from pathlib import Path

import torch

import nano_orion
from nano_orion.attention import attention_mask
from nano_orion.rope import rope_cos_sin

from .runs import ROOT, cache_fill, example_routing
from .style import (
    C_ATTN,
    C_CACHE,
    C_CHOSEN,
    C_EXPERT,
    C_MOE,
    C_NEW,
    C_NORM,
    C_RESID,
    C_ROUTER,
    arrow,
    box,
    canvas,
    pyplot,
)

# ---- moe_block.png: the decoder, one block, the MoE layer routing one token ----------------


def draw_decoder(ax, orion):
    """The decoder, bottom to top: embedding, n_layers blocks, final norm, lm_head."""
    canvas(ax, (0, 4.4), (0, 10))
    ax.set_title("the decoder (Orion-MoE8x7B)")
    rows = [
        (0.6, "token ids (B, T)", "white"),
        (1.8, f"embedding\n{orion.vocab_size:,} × {orion.dim:,}", C_RESID),
        (3.3, "block 0", C_MOE),
        (4.5, "block 1", C_MOE),
        (6.0, f"block {orion.n_layers - 1}", C_MOE),
        (7.3, "final norm", C_NORM),
        (8.4, "lm_head", C_RESID),
        (9.5, f"logits (B, T, {orion.vocab_size:,})", "white"),
    ]
    for y, text, color in rows:
        box(
            ax,
            2,
            y,
            3.2,
            0.8 if "\n" not in text else 0.95,
            text,
            color,
            edge="#444444" if color != "white" else "white",
        )
    for (y0, *_), (y1, *_) in zip(rows, rows[1:]):
        arrow(ax, (2, y0 + 0.45), (2, y1 - 0.45))
    ax.text(2, 5.25, "⋮", ha="center", va="center", fontsize=14)
    # a bracket over the blocks, labelled with their number
    ax.plot([3.75, 3.95, 3.95, 3.75], [2.85, 2.85, 6.45, 6.45], color="#444444", lw=1.0)
    ax.text(4.05, 4.65, f"{orion.n_layers} blocks", ha="left", va="center", rotation=90)


def draw_block(ax):
    """One pre-norm block: the residual stream up the middle, attention and the MoE layer beside it."""
    import matplotlib.pyplot as plt

    canvas(ax, (0, 5), (0, 10))
    ax.set_title("one block (pre-norm)")
    xr = 1.2  # the residual stream's x
    ax.plot([xr, xr], [0.3, 9.6], color="#888888", lw=2.5, zorder=0)
    arrow(ax, (xr, 9.2), (xr, 9.8), color="#888888", lw=2.5)
    ax.text(xr - 0.25, 0.5, "residual stream x", ha="right", va="bottom", rotation=90)
    for y_norm, y_op, y_add, text, color in (
        (1.4, 2.9, 4.3, "attention\nGQA: 32 q / 8 kv heads\nRoPE, causal", C_ATTN),
        (5.3, 6.8, 8.4, "MoE layer\n8 experts, top-2", C_MOE),
    ):
        ax.plot([xr, 3.2], [y_norm - 0.55, y_norm - 0.55], color="#444444", lw=1.2)
        arrow(ax, (3.2, y_norm - 0.55), (3.2, y_norm - 0.3))
        box(ax, 3.2, y_norm, 2.0, 0.6, "norm", C_NORM)
        arrow(ax, (3.2, y_norm + 0.3), (3.2, y_op - 0.55))
        box(ax, 3.2, y_op, 3.2, 1.1, text, color)
        ax.plot([3.2, 3.2], [y_op + 0.55, y_add], color="#444444", lw=1.2)
        arrow(ax, (3.2, y_add), (xr + 0.25, y_add))
        ax.add_patch(plt.Circle((xr, y_add), 0.25, facecolor="white", edgecolor="#444444", zorder=3))
        ax.text(xr, y_add, "+", ha="center", va="center", fontsize=12, zorder=4)


def draw_moe_layer(ax, probs, experts, weights):
    """The MoE layer for one token: router, softmax, top-2, the two chosen experts, the weighted sum."""
    from matplotlib.patches import Rectangle

    n_experts = len(probs)
    canvas(ax, (0, 10), (0, 10))
    ax.set_title("the MoE layer, for one token")
    box(ax, 1.0, 0.6, 1.6, 0.7, "x (dim)", "white")
    arrow(ax, (1.0, 0.95), (1.0, 1.55))
    box(ax, 1.0, 1.95, 1.9, 0.8, "router\ndim → 8", C_ROUTER)
    arrow(ax, (1.95, 1.95), (2.75, 1.95))
    chosen = set(experts.tolist())
    x0, width, base, scale = 2.9, 0.62, 1.4, 4.2
    top = base + probs.max().item() * scale + 0.5  # above the tallest bar and its label
    for e in range(n_experts):  # the 8 probabilities as bars
        xe, p = x0 + e * 0.82, probs[e].item()
        ax.add_patch(
            Rectangle(
                (xe, base),
                width,
                p * scale,
                facecolor="#6aa84f" if e in chosen else "#bbbbbb",
                edgecolor="#444444",
                lw=0.6,
            )
        )
        ax.text(xe + width / 2, base - 0.28, str(e), ha="center", va="center")
        ax.text(xe + width / 2, base + p * scale + 0.22, f"{p:.2f}", ha="center", va="center", fontsize=8.5)
    ax.text(x0 + 4 * 0.82 - 0.1, 0.55, "expert: softmax of the router's scores", ha="center")
    # a bracket over the bars, from which the top-2 step starts
    ax.plot(
        [x0, x0, x0 + 7 * 0.82 + width, x0 + 7 * 0.82 + width],
        [top - 0.12, top, top, top - 0.12],
        color="#444444",
        lw=1.0,
    )
    arrow(ax, (6.2, top), (6.2, 4.45))
    label = ", ".join(f"{e}: {w:.3f}" for e, w in zip(experts.tolist(), weights.tolist()))
    box(ax, 6.2, 4.85, 6.2, 0.75, f"top-{len(experts)}, renormalised → {label}", C_ROUTER)
    y_exp = 6.6
    for e in range(n_experts):  # the experts; only the chosen two compute
        xe = x0 + e * 0.82 + width / 2
        on = e in chosen
        box(
            ax,
            xe,
            y_exp,
            0.7,
            1.0,
            f"E{e}",
            C_CHOSEN if on else C_EXPERT,
            fontsize=9,
            edge="#2d6a1f" if on else "#aaaaaa",
            weight="bold" if on else "normal",
        )
        if on:
            arrow(ax, (xe, 5.25), (xe, y_exp - 0.5), color="#2d6a1f")
            arrow(ax, (xe, y_exp + 0.5), (6.2, 8.45), color="#2d6a1f")
    ax.text(x0 - 0.3, y_exp, "SwiGLU\nexperts", ha="right", va="center")
    e1, e2 = experts.tolist()
    w1, w2 = weights.tolist()
    box(ax, 6.2, 8.8, 5.0, 0.7, f"y = {w1:.3f}·E{e1}(x) + {w2:.3f}·E{e2}(x)", C_MOE)
    arrow(ax, (6.2, 9.15), (6.2, 9.8))


def plot_moe_block(out: Path):
    """The decoder (left), one block (middle), and the MoE layer routing one token (right): the
    numbers are one random token through layer 0's router of the fixture orion-mini-rmsnorm."""
    plt = pyplot()
    from matplotlib.patches import ConnectionPatch

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 6.2), gridspec_kw={"width_ratios": [0.85, 1.0, 1.7]})
    draw_decoder(a, nano_orion.OrionConfig.preset("orion-moe-8x7b"))
    draw_block(b)
    draw_moe_layer(c, *example_routing())
    # zoom lines: a block of the decoder is the middle panel, its MoE box the right one
    for ya, yb in ((3.3 + 0.4, 10), (3.3 - 0.4, 0)):
        fig.add_artist(
            ConnectionPatch((3.6, ya), (0.05, yb), "data", "data", axesA=a, axesB=b, color="#bbbbbb", lw=0.8, ls="--")
        )
    for yb, yc in ((6.8 + 0.55, 10), (6.8 - 0.55, 0)):
        fig.add_artist(
            ConnectionPatch((4.8, yb), (0.05, yc), "data", "data", axesA=b, axesB=c, color="#bbbbbb", lw=0.8, ls="--")
        )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---- gqa.png: which kv head each query head reads ------------------------------------------


def plot_gqa(out: Path):
    """Query heads and the key/value head each reads, for MHA, GQA (Orion) and MQA. Each kv
    head has its own colour (evenly spaced around the hue circle, so none repeats), and its
    query heads share it."""
    plt = pyplot()
    orion = nano_orion.OrionConfig.preset("orion-moe-8x7b")
    H = orion.n_heads
    variants = [
        (f"multi-head (MHA): {H} kv heads", H),
        (f"grouped-query (GQA), Orion: {orion.n_kv_heads} kv heads", orion.n_kv_heads),
        ("multi-query (MQA): 1 kv head", 1),
    ]
    fig, axes = plt.subplots(len(variants), 1, figsize=(10, 7.2))
    hue = plt.get_cmap("hsv")
    for ax, (title, n_kv) in zip(axes, variants):
        group = H // n_kv
        cfg = nano_orion.OrionConfig.preset("orion-moe-8x7b", n_kv_heads=n_kv)
        colors = [hue(kv / n_kv) if n_kv > 1 else "#4a86e8" for kv in range(n_kv)]
        ax.set(xlim=(-3.2, H + 0.3), ylim=(-0.9, 2.3))
        ax.axis("off")
        for h in range(H):
            kv = h // group  # the kv head query head h reads (attention.py)
            box(ax, h + 0.5, 1.6, 0.8, 0.55, str(h), colors[kv], fontsize=8, alpha=0.45)
            kv_x = (kv + 0.5) * group  # under the middle of its group
            ax.plot([h + 0.5, kv_x], [1.32, 0.33], color=colors[kv], lw=0.9)
        for kv in range(n_kv):
            kv_x = (kv + 0.5) * group
            box(
                ax,
                kv_x,
                0.05,
                0.8 if group == 1 else 1.6,
                0.55,  # every head is head_dim numbers wide
                f"kv {kv}" if group > 1 else str(kv),
                colors[kv],
                fontsize=8,
                alpha=0.8,
            )
        ax.text(-3.1, 1.6, "query\nheads", ha="left", va="center")
        ax.text(-3.1, 0.05, "key/value\nheads", ha="left", va="center")
        kib = cfg.kv_cache_bytes_per_token() // 1024
        reads = "query head h reads kv head h" + (f" // {group}" if group > 1 else "")
        ax.set_title(
            f"{title}: {reads}\nKV cache {kib} KiB per token "
            f"({kib * orion.max_seq_len // 1024:,} MiB per {orion.max_seq_len:,}-token sequence)",
            loc="left",
        )
    fig.suptitle(
        f"Which keys and values each of Orion's {H} query heads reads\n(head_dim {orion.head_dim}, bf16 cache, "
        f"all {orion.n_layers} layers)"
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---- kv_cache.png: prefill, then one decode step ------------------------------------------


def plot_kv_cache(out: Path, prompt_len: int = 5, max_len: int = 8):
    """Prefill writes the prompt's keys and values into the cache; a decode step adds one, and
    attends over the whole fixed-size buffer (the mask hides the empty slots)."""
    plt = pyplot()
    after_prefill, after_decode = cache_fill(prompt_len, max_len)
    fig, axes = plt.subplots(2, 1, figsize=(9, 7.6))
    steps = [
        (
            "prefill: the whole prompt in one pass",
            list(range(prompt_len)),
            after_prefill,
            torch.zeros(max_len, dtype=torch.bool),
        ),
        ("decode step: one new token", [prompt_len], after_decode, after_prefill),
    ]
    for ax, (title, new_positions, filled, before) in zip(axes, steps):
        canvas(ax, (-2.2, max_len + 2.4), (-1.9, 5.2))
        ax.set_title(title)
        for p in new_positions:  # tokens going in
            box(ax, p + 0.5, 4.6, 0.8, 0.6, f"t{p}", C_NEW)
            arrow(ax, (p + 0.5, 4.28), (p + 0.5, 3.72))
        ax.text(-2.1, 4.6, "tokens in", va="center")
        box(
            ax,
            (new_positions[0] + new_positions[-1]) / 2 + 0.5,
            3.35,
            0.9 * len(new_positions) + 0.3 if len(new_positions) > 1 else 1.2,
            0.62,
            "q, k, v",
            C_ATTN,
        )
        for y, name in ((2.0, "K"), (1.2, "V")):  # the cache: keys, values; a column per slot
            ax.text(-2.1, y, f"cache {name}", va="center")
            for p in range(max_len):
                if p in new_positions:
                    color, edge = C_NEW, "#b85450"
                elif before[p]:
                    color, edge = C_CACHE, "#6c8ebf"
                else:
                    color, edge = "white", "#bbbbbb"
                assert bool(filled[p]) == (p in new_positions or bool(before[p]))  # what the real KVCache holds
                box(ax, p + 0.5, y, 0.85, 0.6, "", color, edge=edge)
        for p in new_positions:
            arrow(ax, (p + 0.5, 3.03), (p + 0.5, 2.32), color="#b85450")
        for p in range(max_len):
            ax.text(p + 0.5, 0.55, str(p), ha="center", va="center")
        ax.text(max_len / 2, 0.15, "slot = position", ha="center", va="center")
        last = new_positions[-1]
        if len(new_positions) > 1:
            span = last + 1
            text = (
                f"each of the {len(new_positions)} queries attends to the keys up to its own position (causal);\n"
                f"the {len(new_positions)} tokens share every weight read (compute-bound, for a long prompt)"
            )
        else:
            span = max_len  # the buffer has a fixed size and is read whole
            text = (
                f"its one query reads all {max_len} slots of the buffer; the mask hides the {max_len - last - 1} "
                f"empty ones,\nso {last + 1} keys count ({last} cached + its own). Memory-bound: the active weights "
                "and the cache are read for 1 token"
            )
        ax.annotate(
            "", xy=(-0.05, -0.35), xytext=(span + 0.05, -0.35), arrowprops=dict(arrowstyle="<->", color="#444444", lw=1)
        )
        ax.text(max_len / 2, -0.6, text, ha="center", va="top")
    axes[0].text(
        max_len + 2.3, 4.6, f"then: logits of\nthe last position\n→ token t{prompt_len}", ha="right", va="center"
    )
    axes[1].text(max_len + 2.3, 4.6, f"→ token t{prompt_len + 1},\nand so on", ha="right", va="center")
    fig.suptitle(
        f"The KV cache of one layer, read from a real KVCache\n(the fixture, a {prompt_len}-token prompt, room for "
        f"{max_len}). Red: written by this step; blue: cached earlier; white: empty"
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---- rope_angles.png ----------------------------------------------------------------------


def plot_rope(out: Path, head_dim=128, theta=1e6, n_positions=64):
    """Left: cos of each plane's angle over the first positions. Right: each plane's wavelength, Orion vs theta=1e4."""
    plt = pyplot()
    cos, sin = rope_cos_sin(head_dim, n_positions, theta)
    half = head_dim // 2  # planes; column i and i + half hold the same angle
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
    im = a.imshow(
        cos[:, :half].T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower", interpolation="nearest"
    )
    a.set(
        xlabel="position p",
        ylabel=f"plane i (pairs dims i and i + {half})",
        title=f"cos(p · θ^(-2i/{head_dim})), θ = {theta:,.0f}",
    )
    fig.colorbar(im, ax=a, fraction=0.05)
    for th, style in ((theta, "-"), (1e4, "--")):
        c, s = rope_cos_sin(head_dim, 2, th)
        step = torch.atan2(s[1, :half], c[1, :half])  # the angle turned per position, < pi for every plane
        b.semilogy(range(half), (2 * math.pi / step).numpy(), style, label=f"θ = {th:,.0f}")
    b.axhline(8192, color="gray", lw=0.8)
    b.text(1, 8192 * 1.4, "8192 = Orion's max_seq_len", color="gray")
    b.axhline(n_positions, color="gray", lw=0.8, ls=":")
    b.text(1, n_positions * 1.4, f"{n_positions}: the left panel's width", color="gray")
    b.set(xlabel="plane i", ylabel="positions per full turn", title="Each plane's wavelength")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---- attention_masks.png ------------------------------------------------------------------


def plot_masks(out: Path):
    """The three masks attention_mask() builds: causal, a chunk of new tokens over a cache, a
    left-padded row. Tick labels are positions; in the padded row the pads have none."""
    plt = pyplot()
    T = 8
    full = torch.ones(1, T, dtype=torch.bool)
    padded = torch.tensor([[False] * 3 + [True] * 5])
    pad_labels = ["pad"] * 3 + [str(i) for i in range(5)]  # positions count real tokens only
    panels = [
        (
            "causal, 8 tokens",
            attention_mask(torch.arange(T), T, full)[0, 0],
            [str(q) for q in range(T)],
            [str(k) for k in range(T)],
        ),
        (
            "3 new tokens after 5 cached\n(a chunked prefill)",
            attention_mask(torch.arange(5, T), T, full)[0, 0],
            [str(q) for q in range(5, T)],
            [str(k) for k in range(T)],
        ),
        (
            "left-padded row:\n3 pads, 5 real tokens",
            attention_mask(torch.arange(T), T, padded)[0, 0],
            pad_labels,
            pad_labels,
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.2), layout="constrained")
    for ax, (title, mask, q_labels, k_labels) in zip(axes, panels):
        ax.imshow(mask.numpy(), cmap="Greens", vmin=-0.3, vmax=1.2, interpolation="nearest")
        for (q, k), visible in zip(
            torch.cartesian_prod(torch.arange(mask.shape[0]), torch.arange(mask.shape[1])).tolist(),
            mask.flatten().tolist(),
        ):
            ax.text(k, q, "1" if visible else "·", ha="center", va="center", color="white" if visible else "black")
        ax.set_xticks(range(mask.shape[1]), k_labels)
        ax.set_yticks(range(mask.shape[0]), q_labels)
        ax.set(title=title, xlabel="key position", ylabel="query position")
    fig.suptitle("attention_mask(): 1 = the query may attend to the key")
    fig.savefig(out)
    plt.close(fig)


# ---- attention.png: what a trained model's heads attend to ---------------------------------


def plot_attention(out: Path, layer: int = 1):
    """Each head's attention weights in one layer of the small trained model (docs/trained/)
    over one line of code: a row per query token, a column per key token."""
    from .runs import ATTENTION_TEXT, attention_weights

    plt = pyplot()
    model, tokenizer = nano_orion.load(ROOT / "docs/trained")
    ids = torch.tensor([tokenizer.encode(ATTENTION_TEXT)])
    weights = attention_weights(model, ids, layer)
    pieces = [tokenizer.sp.id_to_piece(i).replace("▁", "␣") for i in ids[0].tolist()]
    n_heads, T, _ = weights.shape
    fig, axes = plt.subplots(2, (n_heads + 1) // 2, figsize=(10, 10.6), layout="constrained", squeeze=False)
    for h, ax in enumerate(axes.flat):
        im = ax.imshow(weights[h].numpy(), cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(T), pieces, rotation=90, fontsize=8)
        ax.set_yticks(range(T), pieces, fontsize=8)
        ax.set_title(f"head {h}")
        ax.set(xlabel="key (attended to)", ylabel="query")
    fig.colorbar(im, ax=axes, fraction=0.03, label="attention weight (each row sums to 1)")
    fig.suptitle(
        f"Attention of the trained model's layer {layer} (docs/trained: {model.config.n_layers} layers, "
        f"{n_heads} heads) over one line of code;\nabove the diagonal: the causal mask's zeros"
    )
    fig.savefig(out)
    plt.close(fig)
