"""The released Hugging Face layout of Orion-MoE8x7B: reading it, converting it to
nano_orion's checkpoint format, and exporting back.

The released folder holds ``config.json`` under Mixtral's key names (`config_from_hf`) and
the weights: pickled ``pytorch_model*.bin`` or ``model*.safetensors`` files, sharded with an
index (``*.index.json``: ``{"weight_map": {key: shard file}}``) or in one file. Tensor names
follow Mixtral, one tensor per expert (``model.layers.N.block_sparse_moe.experts.E.w1.weight``);
nano_orion stacks each layer's experts into one (E, ...) tensor, so names are mapped and
experts stacked on the way in (`read_hf`), unstacked on the way out (`export_hf`). Which
norm the model uses, LayerNorm (Orion-14B's) or RMSNorm (Mixtral's), config.json does not
say: `norm_type_of` reads it from the tensors (docs/09_loading.md).

Reading goes through checkpoint.py's safe, memory-mapped readers, one weight file at a time.
Converting holds about one input and one output shard in memory and writes through
atomic.atomic_folder, so a failure leaves nothing behind and changes nothing.
"""

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_folder
from .checkpoint import (
    MAX_SHARD_BYTES,
    TOKENIZER_FILES,
    CheckpointError,
    assemble,
    check_folder,
    check_free_space,
    check_tensor,
    copy_tokenizer,
    expected_shapes,
    first_line,
    missing_tensors,
    read_json,
    read_nano,
    read_weight_file,
    space_needed,
    weight_files,
    write_config,
    write_shards,
)
from .config import OrionConfig
from .model import Orion

# ---- config.json ------------------------------------------------------------------------------

# Our field name -> the released config.json key (Mixtral's names).
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "ffn_dim": "intermediate_size",
    "n_experts": "num_local_experts",
    "top_k": "num_experts_per_tok",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
}

# The released file's remaining keys, which carry no information nano_orion uses.
_HF_TEMPLATE = {
    "architectures": ["OrionMOECausalLM"],
    "model_type": "orion_moe",
    "auto_map": {
        "AutoConfig": "configuration_orion.OrionMOEConfig",
        "AutoModelForCausalLM": "modeling_orion.OrionMOEForCausalLM",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "output_router_logits": False,
    "pretraining_tp": 1,
    "rope_scaling": None,
    "router_jitter_noise": 0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": False,
}


def config_from_hf(src, norm_type: str | None = None) -> OrionConfig:
    """Read a released-style ``config.json`` (a dict, or a path to the file or its folder).

    `norm_type` is not part of the published file; pass what the checkpoint's tensors
    show. Without it, a ``"norm_type"`` key in the file is used (nano_orion's exports
    write one), else ``"layernorm"``, Orion's own choice in Orion-14B.
    """
    if not isinstance(src, dict):
        path = Path(src)
        if path.is_dir():
            path = path / "config.json"
        src = json.loads(path.read_text())
    missing = [k for k in _HF_KEYS.values() if k not in src]
    if missing:
        raise ValueError(f"config.json lacks the keys {missing}")
    # what nano_orion implements, as in the released model
    implemented = {
        "rope_scaling": None,
        "sliding_window": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "head_dim": src["hidden_size"] // src["num_attention_heads"],
    }
    for key, supported in implemented.items():
        if src.get(key) not in (None, supported):
            raise ValueError(
                f"config.json has {key}={src[key]!r}; nano_orion implements only {supported!r}, as in the released "
                "model"
            )
    values = {ours: src[theirs] for ours, theirs in _HF_KEYS.items()}
    values["n_kv_heads"] = src.get("num_key_value_heads") or values["n_heads"]
    values["max_seq_len"] = src.get("max_position_embeddings", OrionConfig.max_seq_len)
    values["router_aux_loss_coef"] = src.get("router_aux_loss_coef", OrionConfig.router_aux_loss_coef)
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        if src.get(theirs) is not None:
            values[ours] = src[theirs]
    values["norm_type"] = norm_type or src.get("norm_type", "layernorm")
    return OrionConfig(**values)


def config_to_hf(config: OrionConfig) -> dict:
    """The released ``config.json`` for this model, plus a ``norm_type`` key of ours."""
    d = dict(_HF_TEMPLATE)
    d.update({theirs: getattr(config, ours) for ours, theirs in _HF_KEYS.items()})
    d.update(
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        max_sequence_length=config.max_seq_len,
        router_aux_loss_coef=config.router_aux_loss_coef,
        bos_token_id=config.bos_id,
        eos_token_id=config.eos_id,
        pad_token_id=config.pad_id,
        norm_type=config.norm_type,
    )
    return d


# ---- tensor names -------------------------------------------------------------------------------

# (released name, nano_orion name). {i} a layer, {e} an expert, {p} weight or bias, {x} q/k/v/o, {w} w1/w2/w3.
_NAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.{p}", "norm.{p}"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.self_attn.{x}_proj.weight", "layers.{i}.attn.w{x}.weight"),
    ("model.layers.{i}.input_layernorm.{p}", "layers.{i}.attn_norm.{p}"),
    ("model.layers.{i}.post_attention_layernorm.{p}", "layers.{i}.moe_norm.{p}"),
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.moe.router.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight", "layers.{i}.moe.experts.{w}"),
]
_GROUPS = {"i": r"\d+", "e": r"\d+", "p": "weight|bias", "x": "[qkvo]", "w": "w[123]"}


def _regex(template: str) -> re.Pattern:
    pattern = template.replace(".", r"\.")
    for group, allowed in _GROUPS.items():
        pattern = pattern.replace("{" + group + "}", f"(?P<{group}>{allowed})")
    return re.compile(pattern)


_HF_TO_NANO = [(_regex(hf), nano) for hf, nano in _NAMES]
_NANO_TO_HF = [(_regex(nano), hf) for hf, nano in _NAMES]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some saves carry; RoPE is recomputed


def hf_name_to_nano(key: str) -> tuple[str, int | None]:
    """A released tensor name -> (nano_orion parameter name, expert index or None)."""
    for pattern, nano in _HF_TO_NANO:
        m = pattern.fullmatch(key)
        if m:
            groups = m.groupdict()
            return nano.format(**groups), int(groups["e"]) if "e" in groups else None
    raise KeyError(key)


def nano_name_to_hf(name: str, expert: int | None = None) -> str:
    """A nano_orion parameter name (and, for w1/w2/w3, an expert index) -> the released name."""
    for pattern, hf in _NANO_TO_HF:
        m = pattern.fullmatch(name)
        if m:
            return hf.format(**m.groupdict(), e=expert)
    raise KeyError(name)


# ---- reading ------------------------------------------------------------------------------------


def norm_type_of(tensor_names) -> str:
    """LayerNorm if the norms have biases, RMSNorm if they have weights only."""
    return "layernorm" if any(re.search(r"norm\.bias$", k) for k in tensor_names) else "rmsnorm"


def read_hf(folder, dtype: torch.dtype | None = None):
    """A released-layout folder -> (config, generator of (nano_orion name, tensor)).

    Reads one weight file at a time. Experts arrive one by one, possibly spread over two
    files; each layer's w1 (or w2, w3) is stacked into one (E, ...) tensor, yielded as soon
    as its last expert has arrived. dtype None keeps the stored dtype. The yielded tensors
    own their memory, so each file is unmapped once read: memory holds one input file plus
    what the consumer keeps (one output shard when converting).
    """
    folder = Path(folder)
    check_folder(folder)
    files = weight_files(folder)
    if None in files.values():  # one file without an index: its keys tell the norm type
        files = {file: list(read_weight_file(folder / file)) for file in files}
    names = [k for keys in files.values() for k in keys]
    try:
        config = config_from_hf(read_json(folder / "config.json"), norm_type=norm_type_of(names))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {first_line(e)}; restore the original config.json") from None
    shapes = expected_shapes(config)
    return config, _hf_tensors(folder, files, config, shapes, dtype)


def _hf_tensors(folder, files, config, shapes, dtype):
    stacks: dict[str, torch.Tensor] = {}  # layers.N.moe.experts.wK -> (E, ...) filled so far
    arrived: dict[str, int] = {}  # how many experts of it
    seen = set()
    for file in files:
        path = folder / file
        for key, tensor in read_weight_file(path).items():
            if _IGNORED.fullmatch(key):
                continue
            try:
                name, expert = hf_name_to_nano(key)
            except KeyError:
                name, expert = None, None
            if name not in shapes or (expert is not None and expert >= config.n_experts):
                raise CheckpointError(
                    f"{path}: unexpected tensor {key} for the {config.n_layers} layers and {config.n_experts} experts "
                    "of config.json; check that config.json belongs to these weights"
                )
            if (name, expert) in seen:
                raise CheckpointError(
                    f"{path}: {key} appears twice; remove the duplicate or download the weights again"
                )
            seen.add((name, expert))
            check_tensor(path, key, tensor, shapes[name] if expert is None else shapes[name][1:])
            if expert is None:
                # a copy, also when the dtype is kept, so that no tensor pins the input file's mapping
                yield name, tensor.to(dtype or tensor.dtype, copy=True)
                continue
            if name not in stacks:
                stacks[name] = torch.empty(shapes[name], dtype=dtype or tensor.dtype)
            stacks[name][expert] = tensor
            arrived[name] = arrived.get(name, 0) + 1
            if arrived[name] == config.n_experts:
                yield name, stacks.pop(name)
    expected = {
        (n, e)
        for n, s in shapes.items()
        for e in (range(config.n_experts) if n.endswith(("w1", "w2", "w3")) else [None])
    }
    missing = sorted(nano_name_to_hf(n, e) for n, e in expected - seen)
    if missing:
        raise missing_tensors(folder, missing)


@torch.no_grad()
def load_hf(folder, device="cpu", dtype=torch.float32) -> Orion:
    """Build an Orion model from a folder in the released Hugging Face layout."""
    config, tensors = read_hf(folder, dtype)
    return assemble(config, tensors, device, dtype)


# ---- converting ---------------------------------------------------------------------------------


def _check_output(out: Path, src: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output folder is the input folder; choose another OUT_DIR")
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another OUT_DIR or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another OUT_DIR")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such folder; create it first")


def _check_free_space(out: Path, src: Path, config: OrionConfig, dtype, n_tensors: int) -> None:
    """Room beside `out` for all the output: the parameters in `dtype` (None: as much as the
    input's weight files), with a margin per tensor for the headers, the tokenizer files, the
    index and config.json (checkpoint.space_needed)."""
    tensor_bytes = (
        config.n_params() * dtype.itemsize if dtype else sum((src / f).stat().st_size for f in weight_files(src))
    )
    tokenizer = [src / name for name in TOKENIZER_FILES if (src / name).exists()]
    check_free_space(out, space_needed(tensor_bytes, n_tensors, tokenizer))


def _progress(tensors, total: int, desc: str):
    # disable=None: no bar when stderr is not a terminal (logs, tests), so errors stay one line
    with tqdm(total=total, desc=desc, unit="tensor", disable=None) as bar:
        for item in tensors:
            yield item
            bar.update(1)


def convert_hf(
    src, out, dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, force: bool = False
) -> None:
    """Released layout in `src` -> nano_orion checkpoint in `out`, one input shard at a time."""
    src, out = Path(src), Path(out)
    config, tensors = read_hf(src, dtype)
    _check_output(out, src, force)
    with atomic_folder(out, replace=force) as tmp:  # here, what a killed run left beside `out` is gone
        _check_free_space(out, src, config, dtype, len(expected_shapes(config)))
        write_shards(_progress(tensors, len(expected_shapes(config)), "converting"), tmp, max_shard_bytes)
        write_config(tmp, config)
        copy_tokenizer(src, tmp)


def export_hf(
    src, out, dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, force: bool = False
) -> None:
    """nano_orion checkpoint in `src` -> the released layout in `out` (safetensors, same tensor
    names and config.json keys as the original, plus our "norm_type"), one shard at a time.
    An RMSNorm model is exactly Mixtral and says so (model_type "mixtral", architectures
    ["MixtralForCausalLM"], no auto_map): AutoModelForCausalLM loads it without remote code."""
    src, out = Path(src), Path(out)
    config, tensors = read_nano(src)
    written = {}  # dtype -> bytes written in it, for config.json's "torch_dtype"

    def hf_tensors():
        for name, t in _progress(tensors, len(expected_shapes(config)), "exporting"):
            t = t.to(dtype or t.dtype)
            written[t.dtype] = written.get(t.dtype, 0) + t.numel() * t.element_size()
            if name.endswith(("w1", "w2", "w3")):
                yield from ((nano_name_to_hf(name, e), t[e]) for e in range(config.n_experts))
            else:
                yield nano_name_to_hf(name), t

    _check_output(out, src, force)
    n_tensors = sum(config.n_experts if name.endswith(("w1", "w2", "w3")) else 1 for name in expected_shapes(config))
    with atomic_folder(out, replace=force) as tmp:
        _check_free_space(out, src, config, dtype, n_tensors)
        write_shards(hf_tensors(), tmp, max_shard_bytes)
        hf_config = config_to_hf(config)
        # The released config.json says "router_jitter_noise": 0, an int; transformers 5 checks
        # the type of this field (MixtralConfig: "expected float, got int"), so export writes 0.0.
        hf_config["router_jitter_noise"] = 0.0
        if config.norm_type == "rmsnorm":
            # Exactly Mixtral, and said so everywhere a tool looks: transformers picks its class by
            # model_type (and maps the per-expert tensor names to its fused layout only for
            # "mixtral"), converters such as llama.cpp's by architectures; no auto_map, since no
            # remote code is needed. A LayerNorm model keeps Orion's names: Mixtral has no LayerNorm.
            hf_config.update(model_type="mixtral", architectures=["MixtralForCausalLM"])
            del hf_config["auto_map"]
        # the weights' own dtype (the one most of their bytes have): transformers loads in it by default
        hf_config["torch_dtype"] = str(max(written, key=written.get)).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_tokenizer(src, tmp)
