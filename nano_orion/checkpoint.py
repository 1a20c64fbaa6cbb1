"""Saving, loading and converting weights: nano_orion's own checkpoints and the released layout.

nano_orion's checkpoint is a folder:

    config.json                     {"nano_orion": 1, "config": OrionConfig.to_dict()}
    model.safetensors               the model's state_dict, experts stacked per layer, or
    model-0000K-of-0000N.safetensors + model.safetensors.index.json when sharded
    tokenizer.model, tokenizer_config.json, generation_config.json   (copied when known)

The released Orion-MoE8x7B folder holds ``config.json`` (Mixtral's key names) and the
weights, either pickled PyTorch files (``pytorch_model*.bin``) or safetensors
(``model*.safetensors``), split into shards listed by an index (``*.index.json``:
``{"weight_map": {key: shard file}}``) or in one file. Its tensor names follow Mixtral and
keep one tensor per expert (``model.layers.N.block_sparse_moe.experts.E.w1.weight``);
nano_orion stacks each layer's experts into one (E, ...) tensor, so names are mapped and
experts stacked on the way in, unstacked on the way out (`export_hf`).

Both readers (`read_hf`, `read_nano`) are generators of (nano_orion name, tensor) that
check every tensor against the shapes config.json implies and touch one weight file at
a time, so the loaders and the converter share one path and one set of error messages:

* Memory. Files are memory-mapped, never read whole: a tensor is paged in from disk when
  used. Converting keeps about one input shard plus one output shard in memory.
* No copy. `load` builds the model on the meta device and points its parameters at the
  memory-mapped tensors (``load_state_dict(assign=True)``); when the file already holds
  the requested dtype and the device is the CPU, the weights are never copied.
* Safety. A pickle can run arbitrary code when loaded. Every ``.bin`` is opened with
  ``torch.load(weights_only=True)``, which only rebuilds plain tensors and containers and
  refuses anything else before running it, and ``mmap=True``.
* Clear errors. Every problem is a `CheckpointError` whose one-line message names the
  file, the problem and what to do. Saving and converting write into a temporary folder
  beside the output and rename the files into place at the end, so a failure leaves
  nothing behind and changes nothing.
* Several GPUs. ``device="auto"`` (or a list of devices) splits the layers across the
  devices, pipeline style (`plan_placement`): the residual stream hops from one device to
  the next, so two 80 GB GPUs hold the 96 GB of bf16 weights.
"""

import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from itertools import accumulate
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import DTYPES, OrionConfig
from .model import Orion

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # largest weight file written: 5 GB, as the released checkpoint's shards


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; the message names the file, the problem and the fix."""


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


# ---- names: released layout <-> nano_orion ------------------------------------------------

# (released name, nano_orion name). {i} a layer, {e} an expert, {p} weight or bias, {x} q/k/v/o, {w} w1/w2/w3.
_NAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.{p}", "norm.{p}"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.self_attn.{x}_proj.weight", "layers.{i}.attn.w{x}.weight"),
    ("model.layers.{i}.input_layernorm.{p}", "layers.{i}.attn_norm.{p}"),
    ("model.layers.{i}.post_attention_layernorm.{p}", "layers.{i}.moe_norm.{p}"),
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.moe.router.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight", "layers.{i}.moe.{w}"),
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


def expected_shapes(config: OrionConfig) -> dict[str, tuple[int, ...]]:
    """nano_orion parameter name -> shape, for a model of this config (built on meta: free)."""
    with torch.device("meta"):
        model = Orion(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---- reading files --------------------------------------------------------------------------


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give the folder holding config.json and the weights")


def read_json(path: Path) -> dict:
    """config.json or an index file."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs the config.json that came with its weights")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(e)}); restore the original file") from None


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .bin or .safetensors file, memory-mapped (nothing read until used)."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing; download the weight files again")
    corrupt = f"{path}: truncated or corrupt ({{}}); download this file again"
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(corrupt.format(_first_line(e))) from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors, and unpickling them could run code; "
            "get the weights from a source you trust, preferably as .safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(corrupt.format(_first_line(e))) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        found = type(tensors).__name__ if not isinstance(tensors, dict) else "a dict with non-tensor values"
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, found {found}; save a plain state_dict")
    return tensors


def _check(path: Path, key: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(
            f"{path}: {key} has shape {tuple(tensor.shape)}, config.json implies {shape}; "
            "check that config.json belongs to these weights"
        )
    if tensor.dtype not in DTYPES.values():
        raise CheckpointError(f"{path}: {key} has unsupported dtype {tensor.dtype}; nano_orion reads {', '.join(DTYPES)} weights")


def _missing(folder: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{folder}: {len(names)} tensors missing, e.g. {', '.join(names[:3])}; the download is incomplete, fetch the weights again"
    )


# ---- the released layout ----------------------------------------------------------------------


def weight_files(folder: Path) -> dict[str, list[str] | None]:
    """Each weight file of a checkpoint folder -> the tensor names it holds (None: one file, no index)."""
    for index_name in (INDEX, "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map; restore the original index file")
            files: dict[str, list[str]] = {}
            for key, file in weight_map.items():
                files.setdefault(file, []).append(key)
            for file in files:
                if not (folder / file).exists():
                    raise CheckpointError(f"{folder / file}: missing, but {index_name} lists it; download this shard again")
            return dict(sorted(files.items()))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return {single: None}
    raise CheckpointError(
        f"{folder}: no weights found; expected model*.safetensors or pytorch_model*.bin, with an index file if sharded"
    )


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
    _check_folder(folder)
    files = weight_files(folder)
    if None in files.values():  # one file without an index: its keys tell the norm type
        files = {file: list(read_weight_file(folder / file)) for file in files}
    names = [k for keys in files.values() for k in keys]
    try:
        config = OrionConfig.from_hf_config(read_json(folder / "config.json"), norm_type=norm_type_of(names))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {_first_line(e)}; restore the original config.json") from None
    shapes = expected_shapes(config)
    return config, _hf_tensors(folder, files, config, shapes, dtype)


def _hf_tensors(folder, files, config, shapes, dtype):
    stacks: dict[str, torch.Tensor] = {}  # layers.N.moe.wK -> (E, ...) filled so far
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
                raise CheckpointError(f"{path}: {key} appears twice; remove the duplicate or download the weights again")
            seen.add((name, expert))
            _check(path, key, tensor, shapes[name] if expert is None else shapes[name][1:])
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
    expected = {(n, e) for n, s in shapes.items() for e in (range(config.n_experts) if n.endswith(("w1", "w2", "w3")) else [None])}
    missing = sorted(nano_name_to_hf(n, e) for n, e in expected - seen)
    if missing:
        raise _missing(folder, missing)


# ---- nano_orion's own format ------------------------------------------------------------------


def is_nano_checkpoint(folder) -> bool:
    _check_folder(Path(folder))
    return "nano_orion" in read_json(Path(folder) / "config.json")


def read_nano(folder):
    """A nano_orion checkpoint folder -> (config, generator of (name, memory-mapped tensor))."""
    folder = Path(folder)
    _check_folder(folder)
    path = folder / "config.json"
    try:
        config = OrionConfig.from_dict(read_json(path)["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a nano_orion config ({_first_line(e)}); restore the original file") from None
    return config, _nano_tensors(folder, weight_files(folder), expected_shapes(config))


def _nano_tensors(folder, files, shapes):
    seen = set()
    for file in files:
        for name, tensor in read_weight_file(folder / file).items():
            if name not in shapes:
                raise CheckpointError(f"{folder / file}: unexpected tensor {name} for config.json's model; check that config.json belongs to these weights")
            _check(folder / file, name, tensor, shapes[name])
            seen.add(name)
            yield name, tensor
    if missing := sorted(set(shapes) - seen):
        raise _missing(folder, missing)


def write_shards(tensors, folder: Path, max_shard_bytes: int) -> None:
    """Write (name, tensor) pairs, in order, as safetensors shards of at most max_shard_bytes
    (a larger tensor gets a shard of its own): model.safetensors if one is enough, else
    model-0000K-of-0000N.safetensors + model.safetensors.index.json. Holds one shard in memory."""
    shard, size, written = {}, 0, []  # written: (temporary file, its tensor names)

    def flush():
        path = folder / f"shard-{len(written):05d}.partial"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))

    total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    names = ["model.safetensors"] if len(written) == 1 else [f"model-{k:05d}-of-{len(written):05d}.safetensors" for k in range(1, len(written) + 1)]
    umask = os.umask(0)
    os.umask(umask)
    for (path, _), name in zip(written, names):
        path.chmod(0o666 & ~umask)  # safetensors creates files readable by their owner only
        path.rename(folder / name)
    if len(written) > 1:
        weight_map = {key: name for (_, keys), name in zip(written, names) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_config(folder: Path, config: OrionConfig) -> None:
    (folder / "config.json").write_text(json.dumps({"nano_orion": FORMAT_VERSION, "config": config.to_dict()}, indent=2) + "\n")


def is_checkpoint_file(name: str) -> bool:
    """A file `save` writes: config.json, the weights and the index (not tokenizer or other files).
    Files of this kind left by an earlier save with other sharding are stale and get replaced."""
    return name in ("config.json", "model.safetensors", INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


def save(model: Orion, folder, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `model` as a nano_orion checkpoint into `folder` (created if needed).

    The files are written into a temporary folder beside `folder` first, so a failed save
    changes nothing. Then the previous checkpoint's config.json and weights (the files
    `is_checkpoint_file` names, stale shards included) move aside, the new ones move in, and
    the old ones are deleted. Other files in `folder` (tokenizer, logs) stay untouched."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        write_shards(model.state_dict().items(), tmp, max_shard_bytes)
        write_config(tmp, model.config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old.mkdir()  # renames only from here on; if one fails, tmp and old still hold every file
    for f in folder.iterdir():
        if is_checkpoint_file(f.name):
            f.rename(old / f.name)
    for f in tmp.iterdir():
        f.rename(folder / f.name)
    tmp.rmdir()
    shutil.rmtree(old)


# ---- converting -------------------------------------------------------------------------------


@contextmanager
def output_folder(out: Path, src: Path, needed_bytes: int, force: bool = False):
    """Yield a fresh temporary folder beside `out`; renamed to `out` on success, deleted on any error."""
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output folder is the input folder; choose another OUT_DIR")
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another OUT_DIR or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another OUT_DIR")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such folder; create it first")
    free = shutil.disk_usage(out.parent).free
    if free < needed_bytes:
        raise CheckpointError(f"{out.parent}: {gb(free)} free, the output needs about {gb(needed_bytes)}; free some space or choose another OUT_DIR")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # --force: swap in the new folder, then drop the old one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _progress(tensors, total: int, desc: str):
    # disable=None: no bar when stderr is not a terminal (logs, tests), so errors stay one line
    with tqdm(total=total, desc=desc, unit="tensor", disable=None) as bar:
        for item in tensors:
            yield item
            bar.update(1)


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)


def _needed_bytes(config: OrionConfig, dtype, src: Path, files) -> int:
    if dtype is None:  # kept as stored: about the size of the input
        return sum((src / f).stat().st_size for f in files)
    return config.n_params() * dtype.itemsize


def convert_hf(src, out, dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, force: bool = False) -> None:
    """Released layout in `src` -> nano_orion checkpoint in `out`, one input shard at a time."""
    src, out = Path(src), Path(out)
    config, tensors = read_hf(src, dtype)
    needed = _needed_bytes(config, dtype, src, weight_files(src))
    with output_folder(out, src, needed, force) as tmp:
        write_shards(_progress(tensors, len(expected_shapes(config)), "converting"), tmp, max_shard_bytes)
        write_config(tmp, config)
        _copy_tokenizer(src, tmp)


def export_hf(src, out, dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, force: bool = False) -> None:
    """nano_orion checkpoint in `src` -> the released layout in `out` (safetensors, same tensor
    names and config.json keys as the original, plus our "norm_type"), one shard at a time.
    An RMSNorm model gets model_type "mixtral", so transformers' MixtralForCausalLM loads it."""
    src, out = Path(src), Path(out)
    config, tensors = read_nano(src)

    def hf_tensors():
        for name, t in _progress(tensors, len(expected_shapes(config)), "exporting"):
            t = t.to(dtype or t.dtype)
            if name.endswith(("w1", "w2", "w3")):
                yield from ((nano_name_to_hf(name, e), t[e]) for e in range(config.n_experts))
            else:
                yield nano_name_to_hf(name), t

    with output_folder(out, src, _needed_bytes(config, dtype, src, weight_files(src)), force) as tmp:
        write_shards(hf_tensors(), tmp, max_shard_bytes)
        hf_config = config.to_hf_config()
        # The released config.json says "router_jitter_noise": 0, an int; transformers 5 checks
        # the type of this field (MixtralConfig: "expected float, got int"), so export writes 0.0.
        hf_config["router_jitter_noise"] = 0.0
        if config.norm_type == "rmsnorm":
            # Exactly Mixtral: let transformers load it natively. transformers 5 maps the per-expert
            # tensor names to its fused layout only for model_type "mixtral"; auto_map still names
            # Orion's own code for trust_remote_code users.
            hf_config["model_type"] = "mixtral"
        if dtype is not None:
            hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _copy_tokenizer(src, tmp)


# ---- loading, on one device or several ---------------------------------------------------------


def plan_placement(sizes: list[int], capacities: list[int]) -> list[int]:
    """Split a pipeline of parts (embedding, layer 0, ..., layer N-1, final norm + head),
    sizes in bytes, into consecutive runs, one per device, each device taking a share of
    the bytes proportional to its capacity (a part goes to the device whose share holds
    its middle byte). -> the device index of each part. Pure: tested without GPUs."""
    total, room = sum(sizes), sum(capacities)
    bounds = [total * c / room for c in accumulate(capacities)]  # where each device's share ends
    plan, start, device = [], 0, 0
    for size in sizes:
        while device < len(capacities) - 1 and start + size / 2 > bounds[device]:
            device += 1
        plan.append(device)
        start += size
    for d, capacity in enumerate(capacities):
        load = sum(size for size, p in zip(sizes, plan) if p == d)
        if load > capacity:
            raise CheckpointError(
                f"the model needs {gb(total)}, the devices offer {gb(room)} ({', '.join(gb(c) for c in capacities)}), "
                f"and device {d} would need {gb(load)}; use more or larger GPUs or a smaller dtype"
            )
    return plan


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])  # 10% left for the KV cache and activations
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def placement(config: OrionConfig, device, dtype: torch.dtype) -> dict[str, torch.device]:
    """Module name ("embed", "layers.N", "norm", "lm_head") -> device. `device` is one
    device, a list of them (layers split in proportion to their free memory), or "auto":
    every visible GPU, else the CPU."""
    if isinstance(device, str) and device == "auto":
        device = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or "cpu"
    modules = ["embed"] + [f"layers.{i}" for i in range(config.n_layers)] + ["norm", "lm_head"]
    if not isinstance(device, (list, tuple)):
        return dict.fromkeys(modules, torch.device(device))
    devices = [torch.device(d) for d in device]
    sizes = dict.fromkeys(modules, 0)
    for name, shape in expected_shapes(config).items():
        sizes[_module_of(name)] += torch.Size(shape).numel() * dtype.itemsize
    parts = [[m] for m in modules[:-2]] + [modules[-2:]]  # the final norm and the head stay together
    plan = plan_placement([sum(sizes[m] for m in part) for part in parts], [_free_bytes(d) for d in devices])
    return {m: devices[d] for part, d in zip(parts, plan) for m in part}


def _module_of(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]


def _assemble(config: OrionConfig, tensors, device, dtype) -> Orion:
    where = placement(config, device, dtype)
    state = {name: t.to(device=where[_module_of(name)], dtype=dtype) for name, t in tensors}
    with torch.device("meta"):
        model = Orion(config)
    model.load_state_dict(state, strict=True, assign=True)  # the tensors become the parameters
    model.init_rope(where["embed"])
    return model.eval()


@torch.no_grad()
def load_hf(folder, device="cpu", dtype=torch.float32) -> Orion:
    """Build an Orion model from a folder in the released Hugging Face layout."""
    config, tensors = read_hf(folder, dtype)
    return _assemble(config, tensors, device, dtype)


@torch.no_grad()
def load_nano(folder, device="cpu", dtype=torch.float32) -> Orion:
    """Build an Orion model from a nano_orion checkpoint folder; weights already of the
    requested dtype stay memory-mapped on the CPU (no copy)."""
    config, tensors = read_nano(folder)
    return _assemble(config, tensors, device, dtype)
