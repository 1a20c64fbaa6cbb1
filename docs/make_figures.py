"""Draw the figures of docs/ from nano_orion's own code and real runs (`make figures`).

    python docs/make_figures.py [--checkpoint DIR] [--train-log OUT_DIR/log.jsonl]
                                [--collapse-log OUT_DIR/log.jsonl] [--out docs/figures]

Figures, each computed here, none drawn by hand:
  moe_block.png        the decoder, one block, and the MoE layer routing one token (the
                       fixture orion-mini-rmsnorm's router supplies the numbers)
  gqa.png              which query heads share which key/value head: MHA, GQA, MQA at
                       Orion's 32 query heads (OrionConfig), with the KV cache each needs
  kv_cache.png         prefill, then one decode step: which slots of a real KVCache each fills
  rope_angles.png      RoPE's rotation per position and plane (nano_orion.rope.rope_cos_sin)
  attention_masks.png  causal, cached and padded masks (nano_orion.attention.attention_mask)
  router.png           router probabilities and chosen experts per token, one sentence in four
                       languages, read from the checkpoint folder --checkpoint
  expert_load.png      each layer's expert load over a training run  } from train.py's log.jsonl
  loss.png             training and validation loss, aux loss, lr    } (--train-log); skipped without it
  collapse.png         expert load with and without the load-balancing loss: --train-log beside
                       --collapse-log (the same run with router_aux_loss_coef 0, `make collapse-demo`)
  roofline.png         attainable FLOP/s against FLOPs per byte on one H100 (spec sheet), with
                       Orion-MoE8x7B's decode and prefill placed by the bytes its weights take
                       (benchmarks/bench_gpu.bytes_per_token on the meta device)

train.py's log.jsonl holds one JSON object per line (docs/08_training.md describes it):
  {"kind": "train", "step", "tokens", "loss", "aux_loss", "lr", "tokens_per_s", "mfu",
   "expert_load": [[float per expert] per layer]}
  {"kind": "eval", "step", "val_loss"}
  {"kind": "save", "step", "folder", "seconds"}   (checkpoint saves: nothing to draw)
The run's config.json beside the log, if there, gives the reference lines of loss.png.

matplotlib is the optional `docs` extra: pip install -e ".[docs]". The functions that read
data need only torch; those that draw import matplotlib when called.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import nano_orion  # noqa: E402
from nano_orion.attention import attention_mask  # noqa: E402
from nano_orion.rope import rope_cos_sin  # noqa: E402

# One sentence, the same meaning in four of the languages Orion was trained on.
SENTENCES = {
    "English": "The weather is nice today.",
    "Chinese": "今天天气很好。",
    "Japanese": "今日はいい天気です。",
    "Korean": "오늘은 날씨가 좋습니다.",
}

TRAIN_KEYS = {"step", "tokens", "loss", "aux_loss", "lr", "tokens_per_s", "mfu", "expert_load"}
EVAL_KEYS = {"step", "val_loss"}


# ---- data ----------------------------------------------------------------------------


def read_train_log(path) -> tuple[list[dict], list[dict]]:
    """train.py's log.jsonl -> (train records, eval records), each sorted by step.

    Raises ValueError naming the line for a record that is not JSON or lacks a field.
    """
    path = Path(path)
    train, evals = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg}); expected one JSON object per line") from None
        kind = record.get("kind")
        if kind == "save":
            continue
        if kind not in ("train", "eval"):
            raise ValueError(f"{path}:{n}: kind must be 'train', 'eval' or 'save', got {kind!r}")
        missing = sorted((TRAIN_KEYS if kind == "train" else EVAL_KEYS) - set(record))
        if missing:
            raise ValueError(f"{path}:{n}: {kind} record lacks {missing}")
        (train if kind == "train" else evals).append(record)
    if not train:
        raise ValueError(f"{path}: no train records; is this train.py's log.jsonl?")
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def expert_shares(train: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """steps (S,) and each expert's share of its layer's routed tokens (S, n_layers, n_experts).

    The log's expert_load rows are normalised to sum to 1, so counts and fractions both work;
    perfect balance is 1 / n_experts everywhere.
    """
    steps = torch.tensor([r["step"] for r in train])
    load = torch.tensor([r["expert_load"] for r in train], dtype=torch.float64)  # (S, n_layers, n_experts)
    return steps, load / load.sum(-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def route_sentence(model, tokenizer, text: str):
    """Run `text` through the model -> (pieces, [(probs (T, n_experts), experts (T, top_k)) per layer])."""
    ids = tokenizer.encode(text)
    model(torch.tensor([ids]))
    routers = model.routing()
    return [tokenizer.sp.id_to_piece(i) for i in ids], routers


def run_config(log_path) -> dict | None:
    """The OrionConfig fields of the run that wrote log_path (its OUT_DIR/config.json), if there."""
    path = Path(log_path).parent / "config.json"
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None


def byte_groups(pieces: list[str]) -> list[tuple[int, int, str]]:
    """(first, last, character) for each run of byte-fallback pieces <0xNN> that spells one
    UTF-8 character: e.g. <0xE4> <0xBB> <0x8A> -> (i, i + 2, "今")."""
    groups, start, buffer = [], None, b""
    for i, piece in enumerate(pieces):
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if not m:
            start, buffer = None, b""
            continue
        if start is None:
            start = i
        buffer += bytes([int(m.group(1), 16)])
        try:
            ch = buffer.decode("utf-8")
        except UnicodeDecodeError:
            if len(buffer) >= 4:
                start, buffer = None, b""
            continue
        groups.append((start, i, ch))
        start, buffer = None, b""
    return groups


@torch.no_grad()
def example_routing(seed: int = 0):
    """One token through layer 0's router of the fixture orion-mini-rmsnorm, as in
    docs/05_moe.md: -> (probs (n_experts,), experts (top_k,), weights (top_k,))."""
    from nano_orion.moe import route

    model, _ = nano_orion.load(ROOT / "tests/fixtures/orion-mini-rmsnorm")
    moe = model.layers[0].moe
    torch.manual_seed(seed)
    x = torch.randn(5, model.config.dim)
    probs, weights, experts = route(moe.router(x), model.config.top_k)
    return probs[0], experts[0], weights[0]


@torch.no_grad()
def cache_fill(prompt_len: int = 5, max_len: int = 8):
    """Which positions of layer 0's KVCache hold keys after a prefill of prompt_len tokens,
    and after one decode step: -> (filled after prefill (max_len,), after decode (max_len,))."""
    model, tokenizer = nano_orion.load(ROOT / "tests/fixtures/orion-mini-rmsnorm")
    ids = torch.tensor([tokenizer.encode("The weather is nice today.")[:prompt_len]])
    cache = model.new_cache(batch_size=1, max_len=max_len)
    logits = model(ids, cache=cache, start_pos=0, last_only=True)  # prefill
    filled = [(cache[0].k[0].abs().sum((0, 2)) > 0).clone()]
    next_id = logits[0, -1].argmax().view(1, 1)
    model(next_id, cache=cache, start_pos=prompt_len)  # one decode step
    filled.append(cache[0].k[0].abs().sum((0, 2)) > 0)
    return filled


# The roofline of one H100 SXM, from NVIDIA's spec sheet: dense bf16 tensor-core arithmetic
# (without sparsity) and HBM3 bandwidth. Inputs, not measurements.
H100_SPEC_FLOPS = 989e12
H100_SPEC_BYTES_PER_S = 3.35e12
# Measured, for comparison: a cuBLAS bf16 GEMV of one Orion expert (14592 x 4096) on one
# NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, November 2026 (benchmarks/bench_gpu.gemv_bandwidth).
H100_MEASURED_GEMV_BYTES_PER_S = 2.62e12


def expected_experts(batch: int, n_experts: int = 8, top_k: int = 2) -> float:
    """Distinct experts a layer reads for `batch` tokens, each choosing top_k of n_experts
    uniformly: n_experts * (1 - (1 - top_k / n_experts) ** batch)."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def roofline_points() -> list[tuple[str, float]]:
    """(label, FLOPs per byte of weights read) of Orion-MoE8x7B's decode and prefill.

    FLOPs: 2 per active parameter per token (attention's own arithmetic over the context is
    left out). Bytes: the weights a step reads (bench_gpu.bytes_per_token, counted on the meta
    device, int8 scales included): batch-1 decode reads top_k experts per layer, a batch of B
    tokens the experts they choose between them (expected_experts), a long prompt all of them.
    """
    from benchmarks.bench_gpu import bytes_per_token
    from nano_orion.quantize import quantize_model

    config = nano_orion.OrionConfig.preset("orion-moe-8x7b", norm_type="rmsnorm")
    with torch.device("meta"):
        bf16 = nano_orion.Orion(config).to(torch.bfloat16)
        int8 = quantize_model(nano_orion.Orion(config).to(torch.bfloat16))
    flops = 2 * config.n_active_params()  # per token
    one_expert = sum(p.numel() * p.element_size() for n, p in bf16.named_parameters() if n.endswith(("w1", "w2", "w3")))
    one_expert //= config.n_experts  # bytes of one expert in every layer
    shared = bytes_per_token(bf16) - config.top_k * one_expert  # attention, routers, norms, lm_head

    def step_bytes(batch):
        return shared + expected_experts(batch, config.n_experts, config.top_k) * one_expert

    return [("decode, batch 1, bf16", flops / bytes_per_token(bf16)),
            ("decode, batch 1, int8", flops / bytes_per_token(int8)),
            ("decode, batch 64, bf16", 64 * flops / step_bytes(64)),
            ("prefill, 4096 tokens, bf16", 4096 * flops / (shared + config.n_experts * one_expert))]


# ---- drawing -------------------------------------------------------------------------


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit('make_figures.py needs matplotlib: pip install -e ".[docs]"')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.titlesize": 10})
    return plt


# Colours of the diagrams: one per kind of thing, the same in every figure.
C_RESID, C_NORM, C_ATTN, C_MOE, C_ROUTER, C_EXPERT, C_CHOSEN, C_CACHE, C_NEW = (
    "#f2f2f2", "#fff2cc", "#dae8fc", "#e1d5e7", "#ffe6cc", "#eeeeee", "#d5e8d4", "#dae8fc", "#f8cecc")


def box(ax, x, y, w, h, text, color="white", fontsize=9, edge="#444444", weight="normal", **kw):
    """A rounded box centred at (x, y), w wide and h high, with centred text."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor=edge, lw=1.0, **kw))
    if text:
        ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def arrow(ax, start, end, color="#444444", lw=1.2, style="-|>", **kw):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=color, lw=lw,
                                 shrinkA=0, shrinkB=0, **kw))


def canvas(ax, xlim, ylim):
    ax.set(xlim=xlim, ylim=ylim, aspect="equal")
    ax.axis("off")


def plot_moe_block(out: Path):
    """The decoder (left), one block (middle), and the MoE layer routing one token (right)."""
    plt = pyplot()
    from matplotlib.patches import ConnectionPatch

    orion = nano_orion.OrionConfig.preset("orion-moe-8x7b")
    probs, experts, weights = example_routing()
    n_experts = len(probs)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 6.4), gridspec_kw={"width_ratios": [0.8, 1.0, 1.6]})

    # the decoder: bottom to top
    canvas(a, (0, 4), (0, 10))
    a.set_title("the decoder (Orion-MoE8x7B)", fontsize=11)
    rows = [(0.6, "token ids (B, T)", "white"), (1.8, f"embedding\n{orion.vocab_size:,} × {orion.dim}", C_RESID),
            (3.3, "block 0", C_MOE), (4.5, "block 1", C_MOE), (6.0, f"block {orion.n_layers - 1}", C_MOE),
            (7.3, "final norm", C_NORM), (8.4, "lm_head", C_RESID), (9.5, f"logits (B, T, {orion.vocab_size:,})", "white")]
    for y, text, color in rows:
        box(a, 2, y, 3.2, 0.8 if "\n" not in text else 0.95, text, color, edge="#444444" if color != "white" else "white")
    for (y0, *_), (y1, *_) in zip(rows, rows[1:]):
        arrow(a, (2, y0 + 0.45), (2, y1 - 0.45))
    a.text(2, 5.25, "⋮", ha="center", va="center", fontsize=14)
    a.text(3.75, 4.65, f"× {orion.n_layers}", ha="left", va="center", fontsize=10, rotation=90)

    # one block: the residual stream runs up the middle
    canvas(b, (0, 5), (0, 10))
    b.set_title("one block (pre-norm)", fontsize=11)
    xr = 1.2  # the residual stream's x
    b.plot([xr, xr], [0.3, 9.6], color="#888888", lw=2.5, zorder=0)
    arrow(b, (xr, 9.2), (xr, 9.8), color="#888888", lw=2.5)
    b.text(xr - 0.25, 0.5, "x: the residual\nstream (B, T, dim)", ha="right", va="bottom", fontsize=8, rotation=90)
    for y_norm, y_op, y_add, text, color in ((1.4, 2.9, 4.3, "attention\nGQA: 32 q / 8 kv heads\nRoPE, causal", C_ATTN),
                                             (5.3, 6.8, 8.4, "MoE layer\n8 experts, top-2", C_MOE)):
        b.plot([xr, 3.2], [y_norm - 0.55, y_norm - 0.55], color="#444444", lw=1.2)
        arrow(b, (3.2, y_norm - 0.55), (3.2, y_norm - 0.3))
        box(b, 3.2, y_norm, 2.0, 0.6, "norm", C_NORM)
        arrow(b, (3.2, y_norm + 0.3), (3.2, y_op - 0.55))
        box(b, 3.2, y_op, 2.8, 1.1, text, color)
        b.plot([3.2, 3.2], [y_op + 0.55, y_add], color="#444444", lw=1.2)
        arrow(b, (3.2, y_add), (xr + 0.25, y_add))
        b.add_patch(plt.Circle((xr, y_add), 0.25, facecolor="white", edgecolor="#444444", zorder=3))
        b.text(xr, y_add, "+", ha="center", va="center", fontsize=12, zorder=4)
    b.text(2.3, 0.2, "x = x + attention(norm(x))\nx = x + moe(norm(x))", ha="left", va="bottom", fontsize=8, family="monospace")

    # the MoE layer, for one token
    canvas(c, (0, 10), (0, 10))
    c.set_title("the MoE layer, for one token", fontsize=11)
    box(c, 1.0, 0.6, 1.6, 0.7, "x (dim)", "white")
    arrow(c, (1.0, 0.95), (1.0, 1.55))
    box(c, 1.0, 1.95, 1.9, 0.8, "router\nlinear dim → 8", C_ROUTER, fontsize=8)
    arrow(c, (1.95, 1.95), (2.6, 1.95))
    # the 8 probabilities as bars
    chosen = set(experts.tolist())
    x0, width, base, scale = 2.9, 0.62, 1.4, 4.2
    for e in range(n_experts):
        xe = x0 + e * 0.82
        c.add_patch(plt.Rectangle((xe, base), width, probs[e].item() * scale,
                                  facecolor="#6aa84f" if e in chosen else "#bbbbbb", edgecolor="#444444", lw=0.6))
        c.text(xe + width / 2, base - 0.25, str(e), ha="center", va="center", fontsize=8)
        c.text(xe + width / 2, base + probs[e].item() * scale + 0.22, f"{probs[e].item():.2f}", ha="center", va="center", fontsize=7)
    c.text(x0 + 4 * 0.82 - 0.1, 0.75, "expert: softmax of the router's scores (float32, sums to 1)", ha="center", fontsize=8)
    arrow(c, (6.2, 3.75), (6.2, 4.45))
    # top-2, renormalised
    label = ", ".join(f"{e}: {w:.3f}" for e, w in zip(experts.tolist(), weights.tolist()))
    box(c, 6.2, 4.85, 5.6, 0.75, f"top-{len(experts)}, renormalised to sum to 1 → {label}", C_ROUTER, fontsize=8)
    # the experts
    y_exp = 6.6
    for e in range(n_experts):
        xe = x0 + e * 0.82 + width / 2
        on = e in chosen
        box(c, xe, y_exp, 0.7, 1.0, f"E{e}", C_CHOSEN if on else C_EXPERT, fontsize=8,
            edge="#2d6a1f" if on else "#aaaaaa", weight="bold" if on else "normal")
        if on:
            arrow(c, (xe, 5.25), (xe, y_exp - 0.5), color="#2d6a1f")
            arrow(c, (xe, y_exp + 0.5), (6.2, 8.45), color="#2d6a1f")
    c.text(x0 - 0.35, y_exp, "SwiGLU\nexperts", ha="right", va="center", fontsize=8)
    c.text(9.9, y_exp - 0.9, "the other six are\nnot computed", ha="right", va="center", fontsize=7, color="#777777")
    e1, e2 = experts.tolist()
    w1, w2 = weights.tolist()
    box(c, 6.2, 8.8, 4.8, 0.7, f"y = {w1:.3f}·E{e1}(x) + {w2:.3f}·E{e2}(x)", C_MOE, fontsize=9)
    arrow(c, (6.2, 9.15), (6.2, 9.8))
    c.text(0.1, 9.6, "numbers: one random token through\nlayer 0's router of the fixture\norion-mini-rmsnorm "
           "(docs/05_moe.md)", fontsize=7, color="#555555", va="top")

    # zoom lines: a block of the decoder is the middle panel, its MoE box the right one
    for ya, yb in ((3.3 + 0.4, 10), (3.3 - 0.4, 0)):
        fig.add_artist(ConnectionPatch((3.6, ya), (0.05, yb), "data", "data", axesA=a, axesB=b, color="#bbbbbb", lw=0.8, ls="--"))
    for yb, yc in ((6.8 + 0.55, 10), (6.8 - 0.55, 0)):
        fig.add_artist(ConnectionPatch((4.6, yb), (0.05, yc), "data", "data", axesA=b, axesB=c, color="#bbbbbb", lw=0.8, ls="--"))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_gqa(out: Path):
    """Query heads and the key/value head each reads, for MHA, GQA (Orion) and MQA."""
    plt = pyplot()
    orion = nano_orion.OrionConfig.preset("orion-moe-8x7b")
    H = orion.n_heads
    variants = [(f"multi-head (MHA): {H} kv heads", H), (f"grouped-query (GQA), Orion: {orion.n_kv_heads} kv heads", orion.n_kv_heads),
                ("multi-query (MQA): 1 kv head", 1)]
    fig, axes = plt.subplots(len(variants), 1, figsize=(12, 6.6))
    colors = plt.get_cmap("tab10").colors
    for ax, (title, n_kv) in zip(axes, variants):
        group = H // n_kv
        cfg = nano_orion.OrionConfig.preset("orion-moe-8x7b", n_kv_heads=n_kv)
        ax.set(xlim=(-2.5, H + 0.5), ylim=(-0.9, 2.3))
        ax.axis("off")
        for h in range(H):
            kv = h // group  # the kv head query head h reads (attention.py)
            color = colors[kv % 10]
            box(ax, h + 0.5, 1.6, 0.8, 0.55, str(h), color, fontsize=7, alpha=0.55 if n_kv == H else 0.45)
            kv_x = (kv + 0.5) * group  # under the middle of its group
            ax.plot([h + 0.5, kv_x], [1.32, 0.33], color=color, lw=0.8, alpha=0.8)
        for kv in range(n_kv):
            kv_x = (kv + 0.5) * group
            box(ax, kv_x, 0.05, 0.8 if group == 1 else 1.6, 0.55,  # every head is head_dim numbers wide
                f"kv {kv}" if group > 1 else str(kv), colors[kv % 10], fontsize=7, alpha=0.9)
        ax.text(-2.4, 1.6, "query\nheads", ha="left", va="center", fontsize=8)
        ax.text(-2.4, 0.05, "key/value\nheads", ha="left", va="center", fontsize=8)
        kib = cfg.kv_cache_bytes_per_token() // 1024
        reads = "query head h reads kv head h" + (f" // {group}" if group > 1 else "")
        ax.set_title(f"{title}: {reads};  KV cache {kib} KiB per token "
                     f"({kib * orion.max_seq_len // 1024:,} MiB per {orion.max_seq_len:,}-token sequence)", fontsize=10, loc="left")
    fig.suptitle(f"Which keys and values each of Orion's {H} query heads reads (head_dim {orion.head_dim}, bf16 cache, "
                 f"all {orion.n_layers} layers)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_kv_cache(out: Path, prompt_len: int = 5, max_len: int = 8):
    """Prefill writes the prompt's keys and values into the cache; a decode step adds one."""
    plt = pyplot()
    after_prefill, after_decode = cache_fill(prompt_len, max_len)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4))
    steps = [("prefill: the whole prompt in one pass", list(range(prompt_len)), after_prefill, torch.zeros(max_len, dtype=torch.bool)),
             ("decode step: one new token", [prompt_len], after_decode, after_prefill)]
    for ax, (title, new_positions, filled, before) in zip(axes, steps):
        canvas(ax, (-2.2, max_len + 0.3), (-1.7, 5.4))
        ax.set_title(title, fontsize=11)
        # tokens going in
        for p in new_positions:
            box(ax, p + 0.5, 4.6, 0.8, 0.6, f"t{p}", C_NEW)
            arrow(ax, (p + 0.5, 4.28), (p + 0.5, 3.72))
        ax.text(-2.1, 4.6, "tokens in", va="center", fontsize=8)
        box(ax, (new_positions[0] + new_positions[-1]) / 2 + 0.5, 3.35, 0.9 * len(new_positions) + 0.3 if len(new_positions) > 1 else 1.2,
            0.62, "q, k, v", C_ATTN, fontsize=8)
        # the cache: one row for keys, one for values, a column per position
        for row, (y, name) in enumerate(((2.0, "K"), (1.2, "V"))):
            ax.text(-2.1, y, f"cache {name}", va="center", fontsize=8)
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
            ax.text(p + 0.5, 0.55, str(p), ha="center", va="center", fontsize=8)
        ax.text(max_len / 2, 0.15, "position", ha="center", va="center", fontsize=8)
        # what attention reads
        last = new_positions[-1]
        ax.annotate("", xy=(-0.05, -0.35), xytext=(last + 1.05, -0.35),
                    arrowprops=dict(arrowstyle="<->", color="#444444", lw=1))
        if len(new_positions) > 1:
            text = f"each of the {len(new_positions)} queries attends to the keys up to its own position (causal)\n" \
                   f"the {len(new_positions)} tokens share every weight read (compute-bound, for a long prompt)"
        else:
            text = f"its one query attends to all {last + 1} keys: {last} cached + its own\n" \
                   "memory-bound: every active weight and the whole cache are read for 1 token"
        ax.text((last + 1) / 2, -0.55, text, ha="center", va="top", fontsize=8)
    axes[0].text(max_len - 0.1, 4.6, f"then: logits of\nthe last position\n→ token t{prompt_len}", ha="right", va="center", fontsize=8)
    axes[1].text(max_len - 0.1, 4.6, f"→ token t{prompt_len + 1},\nand so on", ha="right", va="center", fontsize=8)
    fig.suptitle(f"The KV cache of one layer, read from a real KVCache (the fixture, a {prompt_len}-token prompt, room for "
                 f"{max_len}).  Red: written by this step; blue: cached by earlier steps; white: empty", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out)
    plt.close(fig)


def plot_rope(out: Path, head_dim=128, theta=1e6, n_positions=64):
    """Left: cos of each plane's angle over the first positions. Right: each plane's wavelength, Orion vs theta=1e4."""
    plt = pyplot()
    cos, sin = rope_cos_sin(head_dim, n_positions, theta)
    half = head_dim // 2  # planes; column i and i + half hold the same angle
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    im = a.imshow(cos[:, :half].T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower", interpolation="nearest")
    a.set(xlabel="position p", ylabel="plane i (pairs dims i and i + 64)",
          title=f"cos(p · θ^(-2i/{head_dim})), θ = {theta:g}, head_dim = {head_dim}, first {n_positions} positions")
    fig.colorbar(im, ax=a, fraction=0.04)
    for th, style in ((theta, "-"), (1e4, "--")):
        c, s = rope_cos_sin(head_dim, 2, th)
        step = torch.atan2(s[1, :half], c[1, :half])  # the angle turned per position, < pi for every plane
        b.semilogy(range(half), (2 * math.pi / step).numpy(), style, label=f"θ = {th:g}")
    b.axhline(8192, color="gray", lw=0.8)
    b.text(1, 8192 * 1.3, "8192 = Orion's max_seq_len", color="gray")
    b.axhline(n_positions, color="gray", lw=0.8, ls=":")
    b.text(1, n_positions * 1.3, f"{n_positions}: the left panel's width", color="gray")
    b.set(xlabel="plane i", ylabel="wavelength (positions per full turn)", title="How far each plane travels before repeating")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_masks(out: Path):
    """The three masks attention_mask() builds: causal, a cached decode chunk, a left-padded row."""
    plt = pyplot()
    T = 8
    full = torch.ones(1, T, dtype=torch.bool)
    padded = torch.tensor([[False] * 3 + [True] * 5])
    panels = [
        ("causal, 8 tokens", attention_mask(torch.arange(T), T, full)[0, 0], 0),
        ("decode with a KV cache:\n3 new tokens after 5 cached", attention_mask(torch.arange(5, T), T, full)[0, 0], 5),
        ("left-padded row: 3 pads, 5 real tokens", attention_mask(torch.arange(T), T, padded)[0, 0], 0),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.2), layout="constrained")
    for ax, (title, mask, start_pos) in zip(axes, panels):
        ax.imshow(mask.numpy(), cmap="Greens", vmin=-0.3, vmax=1.2, interpolation="nearest")
        for (q, k), visible in zip(torch.cartesian_prod(torch.arange(mask.shape[0]), torch.arange(mask.shape[1])).tolist(), mask.flatten().tolist()):
            ax.text(k, q, "1" if visible else "·", ha="center", va="center", fontsize=8, color="white" if visible else "black")
        ax.set_xticks(range(mask.shape[1]))
        ax.set_yticks(range(mask.shape[0]), [str(start_pos + q) for q in range(mask.shape[0])])
        ax.set(title=title, xlabel="key position", ylabel="query position")
    axes[2].set_xticks(range(T), ["pad"] * 3 + [str(i) for i in range(5)])
    fig.suptitle("attention_mask(): True (1) = the query may attend to the key")
    fig.savefig(out)
    plt.close(fig)


def printable(piece: str, charmap) -> str:
    """The piece as a tick label, with characters the font cannot draw spelled as U+XXXX."""
    return "".join(ch if ord(ch) in charmap else f"U+{ord(ch):04X}" for ch in piece)


def plot_router(out: Path, checkpoint: Path, layers=None):
    """Router probabilities (colour) and the top_k chosen experts (dots) for each token of SENTENCES.
    Byte-fallback tokens are bracketed by the character they spell. The checkpoint folder must hold
    the tokenizer.model the model was trained with."""
    plt = pyplot()
    from matplotlib import font_manager, ft2font

    charmap = ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap()
    model, tokenizer = nano_orion.load(checkpoint)
    n_layers = model.config.n_layers
    layers = sorted({0, n_layers - 1}) if layers is None else layers
    runs = {lang: route_sentence(model, tokenizer, text) for lang, text in SENTENCES.items()}
    vmax = max(probs.max().item() for _, routers in runs.values() for probs, _ in routers)
    vmax = math.ceil(vmax * 10) / 10  # the colour scale covers the probabilities that occur, not 0..1
    width = max(len(p) for p, _ in runs.values())
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(max(8, 0.25 * width * len(layers)), 2.75 * len(runs)),
                             squeeze=False, layout="constrained")
    for row, (lang, (pieces, routers)) in enumerate(runs.items()):
        for col, layer in enumerate(layers):
            ax = axes[row, col]
            probs, experts = routers[layer]
            im = ax.imshow(probs.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            t = torch.arange(len(pieces)).repeat_interleave(experts.shape[1])
            ax.scatter(t.numpy(), experts.flatten().numpy(), s=14, c="red", marker="o", label=f"chosen (top-{experts.shape[1]})")
            ax.set_xticks(range(len(pieces)), [printable(p, charmap) for p in pieces], rotation=90, fontsize=7)
            ax.set_yticks(range(probs.shape[1]))
            ax.set_ylabel("expert")
            ax.set_xlabel("token, in order (byte tokens bracketed by the character they spell)", fontsize=8)
            for first, last, ch in byte_groups(pieces):  # a bracket above the bytes of one character
                ax.plot([first - 0.4, first - 0.4, last + 0.4, last + 0.4], [-0.75, -0.95, -0.95, -0.75],
                        color="black", lw=0.8, clip_on=False)
                ax.text((first + last) / 2, -1.1, printable(ch, charmap), ha="center", va="bottom", fontsize=6, clip_on=False)
            ax.set_ylim(probs.shape[1] - 0.5, -0.5)
            ax.set_title(f"{lang}: {SENTENCES[lang]!r} in layer {layer}" if all(ord(c) in charmap for c in SENTENCES[lang])
                         else f"{lang}, layer {layer}", loc="left", pad=24)
    axes[0, -1].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, framealpha=0.9)
    fig.colorbar(im, ax=axes, fraction=0.02, label=f"router probability (scale 0 to {vmax:g}; 1/8 = 0.125 is no preference)")
    fig.suptitle(f"Routing in {checkpoint.name} ({n_layers} layers, {model.config.n_experts} experts, top-{model.config.top_k})")
    fig.savefig(out)
    plt.close(fig)


def load_norm(n_experts: int, vmax: float):
    """A colour scale for expert shares centred on perfect balance, 1 / n_experts (white)."""
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vmin=0.0, vcenter=1 / n_experts, vmax=max(math.ceil(vmax * 4) / 4, 2 / n_experts))


def draw_load(ax, steps, shares, norm, title):
    """Heatmap of one run's expert shares: a row per (layer, expert), a column per logged step."""
    S, n_layers, n_experts = shares.shape
    data = shares.permute(1, 2, 0).reshape(n_layers * n_experts, S).numpy()
    width = (steps[1] - steps[0]).item() if S > 1 else 1
    extent = (steps[0].item() - width / 2, steps[-1].item() + width / 2, n_layers * n_experts - 0.5, -0.5)
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest", extent=extent)
    for layer in range(1, n_layers):
        ax.axhline(layer * n_experts - 0.5, color="black", lw=1.0)
    ax.set_yticks([layer * n_experts + (n_experts - 1) / 2 for layer in range(n_layers)],
                  [f"layer {layer}\nexperts\n0 to {n_experts - 1}" for layer in range(n_layers)], fontsize=7)
    ax.set(xlabel="step", title=title)
    return im


def load_colorbar(fig, im, ax, n_experts, vmax):
    ticks = [t for t in (0, 1 / n_experts, 2 / n_experts, 0.25, 0.5, 0.75, 1.0) if t <= vmax + 1e-9]
    bar = fig.colorbar(im, ax=ax, fraction=0.03, ticks=sorted(set(ticks)),
                       label=f"share of the layer's routed slots (white: 1/{n_experts}, perfect balance)")
    bar.ax.set_yticklabels([f"{t:g}" if t != 1 / n_experts else f"1/{n_experts}" for t in sorted(set(ticks))])
    return bar


def plot_expert_load(out: Path, train: list[dict]):
    """Each layer's expert shares over training as a heatmap, white at perfect balance."""
    plt = pyplot()
    steps, shares = expert_shares(train)
    n_layers, n_experts = shares.shape[1:]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.16 * n_layers * n_experts + 1.6), layout="constrained",
                               gridspec_kw={"width_ratios": [1.6, 1]})
    norm = load_norm(n_experts, shares.max().item())
    im = draw_load(a, steps, shares, norm, "each expert's share of its layer's routed slots")
    load_colorbar(fig, im, a, n_experts, norm.vmax)
    for layer in range(n_layers):
        b.plot(steps.numpy(), shares[:, layer].max(-1).values.numpy(), color=f"C{layer}", lw=1.0, label=f"layer {layer} max")
        b.plot(steps.numpy(), shares[:, layer].min(-1).values.numpy(), color=f"C{layer}", lw=1.0, ls="--", label=f"layer {layer} min")
    b.axhline(1 / n_experts, color="gray", lw=0.8, ls=":")
    b.set(xlabel="step", ylabel="share of routed slots", title="busiest (solid) and idlest (dashed) expert per layer",
          ylim=(0, None))
    b.legend(fontsize=7, ncol=2)
    fig.suptitle("Expert load over training")
    fig.savefig(out)
    plt.close(fig)


def plot_loss(out: Path, train: list[dict], evals: list[dict], config: dict | None = None):
    """Training loss with validation loss, the load-balancing loss, and the learning rate.
    With the run's config: reference lines at ln(vocab_size) (a uniform guess) and top_k (balanced aux loss)."""
    plt = pyplot()
    step = [r["step"] for r in train]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.8))
    a.plot(step, [r["loss"] for r in train], lw=0.8, label="train")
    if evals:
        a.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    if config:
        uniform = math.log(config["vocab_size"])
        a.axhline(uniform, color="gray", lw=0.8, ls="--")
        a.text(step[-1], uniform, f"ln {config['vocab_size']} = {uniform:.2f}: a uniform guess", ha="right", va="bottom",
               fontsize=8, color="gray")
        a.set_ylim(top=uniform + 0.4)
    a.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    a.legend(loc="center right")
    b.plot(step, [r["aux_loss"] for r in train], lw=0.8, color="C2")
    if config:
        b.axhline(config["top_k"], color="gray", lw=0.8, ls="--")
        b.text(step[-1], config["top_k"], f"{config['top_k']} = top_k: perfectly even routing", ha="right", va="bottom",
               fontsize=8, color="gray")
    b.set(xlabel="step", title="Load-balancing (aux) loss")
    c.plot(step, [r["lr"] for r in train], color="C3")
    c.set(xlabel="step", title="Learning rate")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_collapse(out: Path, balanced: list[dict], unbalanced: list[dict], top_k: int | None = None,
                  evals: tuple[list[dict], list[dict]] = ((), ())):
    """Expert load of two runs side by side (with and without the load-balancing loss) on one
    colour scale centred on 1/n_experts; the aux loss each measured (logged also at coefficient 0)
    and their validation losses."""
    plt = pyplot()
    (s1, sh1), (s2, sh2) = expert_shares(balanced), expert_shares(unbalanced)
    n_layers, n_experts = sh1.shape[1:]
    if sh2.shape[1:] != sh1.shape[1:]:
        raise ValueError(f"the two runs have different shapes: {tuple(sh1.shape[1:])} and {tuple(sh2.shape[1:])} (layers, experts)")
    fig = plt.figure(figsize=(14, 0.17 * n_layers * n_experts + 2.0), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.85])
    a, b = fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[:, 1])
    c, d = fig.add_subplot(grid[0, 2]), fig.add_subplot(grid[1, 2])
    norm = load_norm(n_experts, max(sh1.max().item(), sh2.max().item()))
    draw_load(a, s1, sh1, norm, "with the load-balancing loss (coefficient 0.01)")
    im = draw_load(b, s2, sh2, norm, "without it (router_aux_loss_coef = 0)")
    load_colorbar(fig, im, [a, b], n_experts, norm.vmax)
    runs = ((balanced, s1, evals[0], "-", "with"), (unbalanced, s2, evals[1], "--", "without"))
    for records, steps, ev, style, name in runs:
        c.plot(steps.numpy(), [r["aux_loss"] for r in records], style, color="C2", lw=1.0, label=f"{name} the loss")
        if ev:
            d.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], style, marker="o", color="C1", lw=1.0,
                   label=f"{name}: " + ", ".join(f"{r['val_loss']:.3f}" for r in ev))
    if top_k:
        c.axhline(top_k, color="gray", lw=0.8, ls=":")
        c.text(max(s1[-1], s2[-1]).item(), top_k - 0.03, f"{top_k} = top_k: even routing", ha="right", va="top", fontsize=8, color="gray")
    c.set(xlabel="step", title="aux loss, averaged over layers\n(the run without it still measures it)")
    c.legend(fontsize=8)
    d.set(xlabel="step", title="validation loss")
    d.legend(fontsize=8)
    fig.suptitle("Expert load with and without the load-balancing loss: the same toy run, seed and data")
    fig.savefig(out)
    plt.close(fig)


def plot_roofline(out: Path):
    """Attainable FLOP/s = min(peak, bandwidth x FLOPs per byte), log-log, for one H100 SXM
    (spec sheet), with Orion-MoE8x7B's workloads placed at their FLOPs per byte."""
    plt = pyplot()
    peak, bandwidth, measured = H100_SPEC_FLOPS / 1e12, H100_SPEC_BYTES_PER_S / 1e12, H100_MEASURED_GEMV_BYTES_PER_S / 1e12
    flops_per_token = 2 * nano_orion.OrionConfig.preset("orion-moe-8x7b").n_active_params() / 1e12  # TFLOP
    ridge = peak / bandwidth  # FLOPs per byte where the two limits meet
    fig, ax = plt.subplots(figsize=(9, 5.6), layout="constrained")
    x = [0.25, ridge, 2e4]
    ax.loglog(x, [min(peak, bandwidth * i) for i in x], color="black", lw=2,
              label=f"H100 SXM, spec sheet: {bandwidth} TB/s, {peak:.0f} TFLOP/s dense bf16")
    ax.loglog([0.25, 60], [measured * 0.25, measured * 60], color="gray", lw=1, ls="--",
              label=f"{measured} TB/s: a bf16 GEMV measured on one H100 80GB HBM3 (November 2026)")
    ax.axvspan(0.25, ridge, color="#dae8fc", alpha=0.45, lw=0)
    ax.text(0.3, 1800, "memory-bound: time = bytes / bandwidth", fontsize=9, va="center")
    ax.text(ridge * 1.15, 1800, "compute-bound:\ntime = FLOPs / peak", fontsize=9, va="center")
    ax.axvline(ridge, color="gray", lw=0.8, ls=":")
    ax.text(ridge * 0.9, 5, f"ridge: {ridge:.0f} FLOPs per byte", fontsize=8, rotation=90, va="bottom", ha="right", color="#444444")
    markers = {"decode, batch 1, bf16": ("o", "C0", ""), "decode, batch 1, int8": ("s", "C2", ""),
               "decode, batch 64, bf16": ("^", "C1", " (all 64 streams)"), "prefill, 4096 tokens, bf16": ("D", "C3", " of prompt")}
    for label, intensity in roofline_points():
        attainable = min(peak, bandwidth * intensity)
        marker, color, which = markers[label]
        ax.loglog([intensity], [attainable], marker, color=color, ms=9, mec="black",
                  label=f"{label}: {intensity:.{1 if intensity < 100 else 0}f} FLOPs/byte; at most {attainable:.3g} TFLOP/s "
                  f"({attainable / peak:.1%} of peak) = {attainable / flops_per_token:,.0f} tokens/s{which}")
    ax.set(xlim=(0.25, 2e4), ylim=(0.3, 4000), xlabel="arithmetic intensity: FLOPs per byte read from memory",
           ylabel="attainable TFLOP/s (an upper bound)")
    ax.set_title("The roofline of one H100 SXM, and where Orion-MoE8x7B's work sits on it\n"
                 "(2 FLOPs per active weight and token; bytes: the weights a step reads)", fontsize=10)
    ax.grid(True, which="major", color="#dddddd", lw=0.6)
    ax.legend(loc="lower right", fontsize=7.5, framealpha=0.95)
    fig.savefig(out)
    plt.close(fig)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "tests/fixtures/orion-mini-rmsnorm",
                        help="checkpoint folder (nano_orion or released layout, with tokenizer.model) for router.png "
                        "(default: the random-weight test fixture orion-mini-rmsnorm)")
    parser.add_argument("--train-log", type=Path, default=None,
                        help="train.py's OUT_DIR/log.jsonl for expert_load.png and loss.png (skipped if not given)")
    parser.add_argument("--collapse-log", type=Path, default=None,
                        help="the log.jsonl of the same run without the load-balancing loss (make collapse-demo), "
                        "drawn beside --train-log's in collapse.png (skipped if not given)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/figures", help="folder for the PNGs (default: docs/figures)")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").exists():
        parser.error(f"--checkpoint {args.checkpoint}: no config.json there; point at a checkpoint folder")
    if not (args.checkpoint / "tokenizer.model").exists():
        parser.error(f"--checkpoint {args.checkpoint}: no tokenizer.model there; router.png needs it to encode "
                     "its sentences (copy the tokenizer the model was trained with into the folder)")
    for flag, log in (("--train-log", args.train_log), ("--collapse-log", args.collapse_log)):
        if log is not None and not log.is_file():
            parser.error(f"{flag} {log}: no such file; point at train.py's OUT_DIR/log.jsonl")
    if args.collapse_log is not None and args.train_log is None:
        parser.error("--collapse-log is drawn beside --train-log's run; give both")
    train = evals = collapse = collapse_evals = None
    if args.train_log is not None:  # read first, so a bad log leaves no half-made figures
        train, evals = read_train_log(args.train_log)
    if args.collapse_log is not None:
        collapse, collapse_evals = read_train_log(args.collapse_log)
    args.out.mkdir(parents=True, exist_ok=True)

    made = ["moe_block.png", "gqa.png", "kv_cache.png", "rope_angles.png", "attention_masks.png", "router.png", "roofline.png"]
    plot_moe_block(args.out / "moe_block.png")
    plot_gqa(args.out / "gqa.png")
    plot_kv_cache(args.out / "kv_cache.png")
    plot_rope(args.out / "rope_angles.png")
    plot_masks(args.out / "attention_masks.png")
    plot_router(args.out / "router.png", args.checkpoint)
    plot_roofline(args.out / "roofline.png")
    if train is None:
        print("no --train-log given: skipping expert_load.png, loss.png and collapse.png "
              "(run train.py, then pass OUT_DIR/log.jsonl)")
    else:
        config = run_config(args.train_log)
        plot_expert_load(args.out / "expert_load.png", train)
        plot_loss(args.out / "loss.png", train, evals, config)
        made += ["expert_load.png", "loss.png"]
        if collapse is None:
            print("no --collapse-log given: skipping collapse.png (make collapse-demo writes one)")
        else:
            plot_collapse(args.out / "collapse.png", train, collapse, config and config["top_k"], (evals, collapse_evals))
            made.append("collapse.png")
    print(f"wrote {', '.join(made)} to {args.out}")


if __name__ == "__main__":
    main()
