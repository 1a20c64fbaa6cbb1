"""The data the figures draw: the committed runs in docs/runs/ (train.py's logs, the router's
record of four sentences) and a few numbers read from nano_orion's own code and fixtures.

train.py's log.jsonl holds one JSON object per line (docs/08_training.md describes it):
  {"kind": "train", "step", "tokens", "loss", "aux_loss", "lr", "tokens_per_s", "mfu",
   "expert_load": [[float per expert] per layer]}
  {"kind": "eval", "step", "val_loss"}
  {"kind": "save", "step", "folder", "seconds"}   (checkpoint saves: nothing to draw)
The run's config.json beside the log, if there, gives the reference lines of loss.png.
"""

import json
import re
from pathlib import Path

import torch

import nano_orion

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "docs" / "runs"  # the committed runs: RUNS/<name>/log.jsonl and config.json

# One sentence, the same meaning in four of the languages Orion was trained on.
SENTENCES = {
    "English": "The weather is nice today.",
    "Chinese": "今天天气很好。",
    "Japanese": "今日はいい天気です。",
    "Korean": "오늘은 날씨가 좋습니다.",
}

TRAIN_KEYS = {"step", "tokens", "loss", "aux_loss", "lr", "tokens_per_s", "mfu", "expert_load"}
EVAL_KEYS = {"step", "val_loss"}


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


def run_config(log_path) -> dict | None:
    """The OrionConfig fields of the run that wrote log_path (its OUT_DIR/config.json), if there."""
    path = Path(log_path).parent / "config.json"
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None


def read_run(name: str, runs: Path = RUNS):
    """(train records, eval records, config or None) of the committed run RUNS/name."""
    train, evals = read_train_log(Path(runs) / name / "log.jsonl")
    return train, evals, run_config(Path(runs) / name / "log.jsonl")


@torch.no_grad()
def route_sentence(model, tokenizer, text: str):
    """Run `text` through the model -> (pieces, [(probs (T, n_experts), experts (T, top_k)) per layer])."""
    ids = tokenizer.encode(text)
    model(torch.tensor([ids]))
    routers = model.routing()
    return [tokenizer.sp.id_to_piece(i) for i in ids], routers


@torch.no_grad()
def record_routing(checkpoint, path):
    """Route SENTENCES through the checkpoint and write what every layer's router did to path
    (JSON): per sentence its pieces, and per layer each token's probabilities (5 decimals) and
    chosen experts. router.png and the numbers docs/05_moe.md quotes are read from it."""
    model, tokenizer = nano_orion.load(checkpoint)
    record = {
        "checkpoint": Path(checkpoint).name,
        "n_experts": model.config.n_experts,
        "top_k": model.config.top_k,
        "sentences": {},
    }
    for lang, text in SENTENCES.items():
        pieces, routers = route_sentence(model, tokenizer, text)
        record["sentences"][lang] = {
            "text": text,
            "pieces": pieces,
            "layers": [
                {"probs": [[round(p, 5) for p in row] for row in probs.tolist()], "experts": experts.tolist()}
                for probs, experts in routers
            ],
        }
    Path(path).write_text(json.dumps(record, ensure_ascii=False) + "\n")


def read_routing(path) -> dict:
    """record_routing's file -> {"checkpoint", "n_experts", "top_k", "sentences": {lang: {"text",
    "pieces", "layers": [(probs (T, n_experts), experts (T, top_k)) per layer]}}}."""
    record = json.loads(Path(path).read_text())
    for sentence in record["sentences"].values():
        sentence["layers"] = [
            (torch.tensor(layer["probs"]), torch.tensor(layer["experts"])) for layer in sentence["layers"]
        ]
    return record


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


# The line of argparse.py-style code whose attention attention.png shows (walkthrough 4).
ATTENTION_TEXT = "parser.add_argument('--verbose', action='store_true')"


@torch.no_grad()
def attention_weights(model, ids, layer: int) -> torch.Tensor:
    """The causal attention weights of one layer for the token ids (1, T): (n_heads, T, T),
    computed by hand from the layer's own wq, wk and RoPE, as walkthrough 4 does."""
    import math

    from nano_orion.rope import apply_rope

    cfg, seen = model.config, {}
    hook = model.layers[layer].attn_norm.register_forward_hook(lambda module, args, out: seen.update(x=out))
    try:
        model(ids)
    finally:
        hook.remove()
    x, attn = seen["x"], model.layers[layer].attn
    B, T, _ = x.shape
    cos, sin = model.rope_cos[:T][None], model.rope_sin[:T][None]
    q = apply_rope(attn.wq(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.head_dim)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)[0]
