"""Draw the figures of docs/ from nano_orion's own code and real runs (`make figures`).

    python docs/make_figures.py [--checkpoint DIR] [--train-log OUT_DIR/log.jsonl] [--out docs/figures]

Figures, each computed here, none drawn by hand:
  rope_angles.png      RoPE's rotation per position and plane (nano_orion.rope.rope_cos_sin)
  attention_masks.png  causal, cached and padded masks (nano_orion.attention.attention_mask)
  router.png           router probabilities and chosen experts per token, one sentence in four
                       languages, read from the checkpoint folder --checkpoint
  expert_load.png      each layer's expert load over a training run  } from train.py's log.jsonl
  loss.png             training and validation loss, aux loss, lr    } (--train-log); skipped without it

train.py's log.jsonl holds one JSON object per line:
  {"kind": "train", "step", "tokens", "loss", "aux_loss", "lr", "tokens_per_s", "mfu",
   "expert_load": [[float per expert] per layer]}
  {"kind": "eval", "step", "val_loss"}
  {"kind": "save", "step", "folder", "seconds"}   (checkpoint saves: nothing to draw)

matplotlib is the optional `docs` extra: pip install -e ".[docs]". The functions that read
data need only torch; those that draw import matplotlib when called.
"""

import argparse
import json
import math
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


def plot_rope(out: Path, head_dim=128, theta=1e6, n_positions=2048):
    """Left: cos of each plane's angle over positions. Right: each plane's wavelength, Orion vs theta=1e4."""
    plt = pyplot()
    cos, sin = rope_cos_sin(head_dim, n_positions, theta)
    half = head_dim // 2  # planes; column i and i + half hold the same angle
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    im = a.imshow(cos[:, :half].T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower", interpolation="nearest")
    a.set(xlabel="position p", ylabel="plane i (pairs dims i and i + 64)",
          title=f"cos(p · θ^(-2i/{head_dim})), θ = {theta:g}, head_dim = {head_dim}")
    fig.colorbar(im, ax=a, fraction=0.04)
    for th, style in ((theta, "-"), (1e4, "--")):
        c, s = rope_cos_sin(head_dim, 2, th)
        step = torch.atan2(s[1, :half], c[1, :half])  # the angle turned per position, < pi for every plane
        b.semilogy(range(half), (2 * math.pi / step).numpy(), style, label=f"θ = {th:g}")
    b.axhline(8192, color="gray", lw=0.8)
    b.text(1, 8192 * 1.3, "8192 = Orion's max_seq_len", color="gray")
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
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9))
    for ax, (title, mask, start_pos) in zip(axes, panels):
        ax.imshow(mask.numpy(), cmap="Greens", vmin=-0.3, vmax=1.2, interpolation="nearest")
        for (q, k), visible in zip(torch.cartesian_prod(torch.arange(mask.shape[0]), torch.arange(mask.shape[1])).tolist(), mask.flatten().tolist()):
            ax.text(k, q, "1" if visible else "·", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(mask.shape[1]))
        ax.set_yticks(range(mask.shape[0]), [str(start_pos + q) for q in range(mask.shape[0])])
        ax.set(title=title, xlabel="key position", ylabel="query position")
    axes[2].set_xticks(range(T), ["pad"] * 3 + [str(i) for i in range(5)])
    fig.suptitle("attention_mask(): True (1) = the query may attend to the key", y=0.99)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def printable(piece: str, charmap) -> str:
    """The piece as a tick label, with characters the font cannot draw spelled as U+XXXX."""
    return "".join(ch if ord(ch) in charmap else f"U+{ord(ch):04X}" for ch in piece)


def plot_router(out: Path, checkpoint: Path, layers=None):
    """Router probabilities (colour) and the top_k chosen experts (dots) for each token of SENTENCES.
    The checkpoint folder must hold the tokenizer.model the model was trained with."""
    plt = pyplot()
    from matplotlib import font_manager, ft2font

    charmap = ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap()
    model, tokenizer = nano_orion.load(checkpoint)
    n_layers = model.config.n_layers
    layers = sorted({0, n_layers - 1}) if layers is None else layers
    runs = {lang: route_sentence(model, tokenizer, text) for lang, text in SENTENCES.items()}
    width = max(len(p) for p, _ in runs.values())
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(max(8, 0.24 * width * len(layers)), 2.3 * len(runs)),
                             squeeze=False, layout="constrained")
    for row, (lang, (pieces, routers)) in enumerate(runs.items()):
        for col, layer in enumerate(layers):
            ax = axes[row, col]
            probs, experts = routers[layer]
            im = ax.imshow(probs.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            t = torch.arange(len(pieces)).repeat_interleave(experts.shape[1])
            ax.scatter(t.numpy(), experts.flatten().numpy(), s=14, c="red", marker="o", label=f"chosen (top-{experts.shape[1]})")
            ax.set_xticks(range(len(pieces)), [printable(p, charmap) for p in pieces], rotation=90, fontsize=7)
            ax.set_yticks(range(probs.shape[1]))
            ax.set_ylabel("expert")
            ax.set_title(f"{lang}, layer {layer}", loc="left")
    axes[0, -1].legend(loc="upper right", fontsize=7, framealpha=0.9)
    fig.colorbar(im, ax=axes, fraction=0.02, label="router probability")
    fig.suptitle(f"Routing in {checkpoint.name} ({n_layers} layers, {model.config.n_experts} experts, top-{model.config.top_k})")
    fig.savefig(out)
    plt.close(fig)


def plot_expert_load(out: Path, train: list[dict]):
    """One panel per layer: each expert's share of the routed tokens over training, stacked."""
    plt = pyplot()
    steps, shares = expert_shares(train)
    n_layers, n_experts = shares.shape[1:]
    cols = min(4, n_layers)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.8), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    colors = plt.get_cmap("tab10").colors
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.axis("off")
            continue
        ax.stackplot(steps.numpy(), shares[:, layer].T.numpy(), colors=colors[:n_experts], labels=[f"expert {e}" for e in range(n_experts)])
        for e in range(1, n_experts):
            ax.axhline(e / n_experts, color="white", lw=0.5, ls=":")  # where the bands lie when balanced
        ax.set(title=f"layer {layer}", ylim=(0, 1))
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of routed tokens")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncol=n_experts, fontsize=7)
    fig.suptitle("Expert load per layer (dotted lines: perfect balance)")
    fig.savefig(out)
    plt.close(fig)


def plot_loss(out: Path, train: list[dict], evals: list[dict]):
    """Training loss with validation loss, the load-balancing loss, and the learning rate."""
    plt = pyplot()
    step = [r["step"] for r in train]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.6))
    a.plot(step, [r["loss"] for r in train], lw=0.8, label="train")
    if evals:
        a.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    a.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    a.legend()
    b.plot(step, [r["aux_loss"] for r in train], lw=0.8, color="C2")
    b.set(xlabel="step", title="Load-balancing (aux) loss")
    c.plot(step, [r["lr"] for r in train], color="C3")
    c.set(xlabel="step", title="Learning rate")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "tests/fixtures/orion-mini-rmsnorm",
                        help="checkpoint folder (nano_orion or released layout, with tokenizer.model) for router.png "
                        "(default: the random-weight test fixture orion-mini-rmsnorm)")
    parser.add_argument("--train-log", type=Path, default=None,
                        help="train.py's OUT_DIR/log.jsonl for expert_load.png and loss.png (skipped if not given)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/figures", help="folder for the PNGs (default: docs/figures)")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").exists():
        parser.error(f"--checkpoint {args.checkpoint}: no config.json there; point at a checkpoint folder")
    if not (args.checkpoint / "tokenizer.model").exists():
        parser.error(f"--checkpoint {args.checkpoint}: no tokenizer.model there; router.png needs it to encode "
                     "its sentences (copy the tokenizer the model was trained with into the folder)")
    if args.train_log is not None and not args.train_log.is_file():
        parser.error(f"--train-log {args.train_log}: no such file; point at train.py's OUT_DIR/log.jsonl")
    train = evals = None
    if args.train_log is not None:
        train, evals = read_train_log(args.train_log)  # read first, so a bad log leaves no half-made figures
    args.out.mkdir(parents=True, exist_ok=True)

    plot_rope(args.out / "rope_angles.png")
    plot_masks(args.out / "attention_masks.png")
    plot_router(args.out / "router.png", args.checkpoint)
    made = ["rope_angles.png", "attention_masks.png", "router.png"]
    if train is None:
        print("no --train-log given: skipping expert_load.png and loss.png (run train.py, then pass OUT_DIR/log.jsonl)")
    else:
        plot_expert_load(args.out / "expert_load.png", train)
        plot_loss(args.out / "loss.png", train, evals)
        made += ["expert_load.png", "loss.png"]
    print(f"wrote {', '.join(made)} to {args.out}")


if __name__ == "__main__":
    main()
