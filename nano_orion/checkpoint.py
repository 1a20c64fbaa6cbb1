"""Saving and loading weights: nano_orion's own checkpoints and the released layout.

nano_orion's checkpoint is a folder:

    config.json                     {"nano_orion": 1, "config": OrionConfig.to_dict()}
    model.safetensors               the model's state_dict, experts stacked per layer, or
    model-0000K-of-0000N.safetensors + model.safetensors.index.json when sharded
    tokenizer.model, tokenizer_config.json, generation_config.json   (copied when known)

It loads without copying: the model is built on the meta device and its parameters are
pointed at the memory-mapped safetensors (``load_state_dict(assign=True)``).

The released Orion-MoE8x7B folder holds ``config.json`` and the weights, either pickled
PyTorch files (``pytorch_model*.bin``) or safetensors (``model*.safetensors``), split into
shards listed by an index (``*.index.json``: ``{"weight_map": {key: shard file}}``) or in
one file. Its tensor names follow Mixtral (``model.layers.N.block_sparse_moe.experts.E.w1.weight``);
nano_orion stacks each layer's experts into one tensor, so names are mapped on the way in.

Safety: a pickle can run arbitrary code when loaded. Every ``.bin`` is opened with
``torch.load(weights_only=True)``, which only rebuilds plain tensors and refuses anything
else, and ``mmap=True``, so a 10 GB shard is paged in from disk rather than read into RAM.

Memory: the model is built on the meta device (no memory), given empty storage of the
requested dtype and device, and filled one shard at a time: peak memory is the model
plus one shard, never two copies of the model.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from safetensors.torch import save_file

from .config import OrionConfig
from .model import Orion

FORMAT_VERSION = 1

# Released name -> nano_orion name. Expert tensors carry their expert index as a second group.
_HF_TO_NANO = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.(weight|bias)", r"norm.\1"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.attn.w\2.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.moe_norm.\2"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.moe.router.weight"),
]
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some saves carry; RoPE is recomputed


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message names the file, the problem and the fix."""


def hf_name_to_nano(key: str) -> tuple[str, int | None]:
    """A released tensor name -> (nano_orion parameter name, expert index or None)."""
    m = _HF_EXPERT.fullmatch(key)
    if m:
        layer, expert, w = m.groups()
        return f"layers.{layer}.moe.{w}", int(expert)
    for pattern, replacement in _HF_TO_NANO:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key), None
    raise KeyError(key)


def hf_weight_files(folder: Path) -> dict[str, list[str]]:
    """Map each weight file of a released-layout folder to the tensor names it holds."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                files.setdefault(file, []).append(key)
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return {single: list(read_weight_file(folder / single))}
    raise CheckpointError(
        f"{folder}: no weights found; expected model*.safetensors or pytorch_model*.bin, "
        "with an index file if sharded"
    )


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .bin or .safetensors file, memory-mapped where the format allows."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return tensors


def norm_type_of(tensor_names) -> str:
    """LayerNorm if the norms have biases, RMSNorm if they have weights only."""
    return "layernorm" if any(re.search(r"norm\.bias$", k) for k in tensor_names) else "rmsnorm"


@torch.no_grad()
def load_hf(folder, device="cpu", dtype=torch.float32) -> Orion:
    """Build an Orion model from a folder in the released Hugging Face layout."""
    folder = Path(folder)
    files = hf_weight_files(folder)
    names = [k for keys in files.values() for k in keys]
    config = OrionConfig.from_hf_config(folder / "config.json", norm_type=norm_type_of(names))

    with torch.device("meta"):
        model = Orion(config)
    model = model.to(dtype).to_empty(device=device)  # real but uninitialised storage
    model.init_rope(device)
    params = dict(model.named_parameters())
    filled = set()
    for file in files:
        for key, tensor in read_weight_file(folder / file).items():
            if _IGNORED.fullmatch(key):
                continue
            try:
                name, expert = hf_name_to_nano(key)
                target = params[name] if expert is None else params[name][expert]
            except (KeyError, IndexError):
                raise CheckpointError(f"{folder / file}: unexpected tensor {key!r} for this config") from None
            if tensor.shape != target.shape:
                raise CheckpointError(
                    f"{folder / file}: {key} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}"
                )
            target.copy_(tensor)
            filled.add((name, expert))
    expected = {(n, e) for n, p in params.items() for e in (range(config.n_experts) if n.endswith(("w1", "w2", "w3")) else [None])}
    missing = sorted(f"{n}[{e}]" if e is not None else n for n, e in expected - filled)
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    return model.eval()


# ---- nano_orion's own format -------------------------------------------------------------


def is_nano_checkpoint(folder) -> bool:
    config = Path(folder) / "config.json"
    return config.exists() and "nano_orion" in json.loads(config.read_text())


def shard_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def save(model: Orion, folder, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a nano_orion checkpoint into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"nano_orion": FORMAT_VERSION, "config": model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def load_nano(folder, device="cpu", dtype=torch.float32) -> Orion:
    """Build an Orion model from a nano_orion checkpoint folder, without copying weights
    that are already of the requested dtype on the CPU."""
    folder = Path(folder)
    config = OrionConfig.from_dict(json.loads((folder / "config.json").read_text())["config"])
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for file in files:
        state.update(read_weight_file(folder / file))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = Orion(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    return model.eval()
