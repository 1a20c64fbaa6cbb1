"""nano_orion's own checkpoint format: reading weight files safely, saving, loading.

A nano_orion checkpoint is a folder:

    config.json                     {"nano_orion": 1, "config": OrionConfig.to_dict()}
    model.safetensors               the model's state_dict, experts stacked per layer, or
    model-0000K-of-0000N.safetensors + model.safetensors.index.json when sharded
    tokenizer.model, tokenizer_config.json, generation_config.json   (copied when known)

The file readers here serve the released layout's reader (hf_layout.py) too:

* Memory. Files are memory-mapped, one at a time: a tensor is paged in from disk when used.
  `load_nano` builds the model on the meta device and points its parameters at the mapped
  tensors (``load_state_dict(assign=True)``): in the stored dtype on the CPU, no copy at all.
* Safety. A pickle can run arbitrary code when loaded. Every ``.bin`` is opened with
  ``torch.load(weights_only=True)``, which only rebuilds plain tensors and containers and
  refuses anything else before running it, and ``mmap=True``.
* Clear errors. Every problem is a `CheckpointError` whose one-line message names the
  file, the problem and what to do; every tensor is checked against the shapes config.json
  implies (`expected_shapes`).

Saving (`save`) replaces a folder's checkpoint in one step, so a checkpoint is always whole
where users look for it. Everything the new checkpoint holds, train.py's train_state.pt too,
is written into a hidden temporary folder beside the target, the target's other files (a log)
are linked into it, and the two folders swap places (atomic.atomic_folder): at every instant
the folder's path holds the old checkpoint or the new one, complete, so `nano_orion.load`,
generate.py, train.py's --resume and a plain `cp -r` need no rule about where to read from.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_folder
from .config import DTYPES, OrionConfig
from .model import Orion
from .placement import gb, module_of, place, placement

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # largest weight file written: 5 GB, as the released checkpoint's shards


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; the message names the file, the problem and the fix."""


def expected_shapes(config: OrionConfig) -> dict[str, tuple[int, ...]]:
    """nano_orion parameter name -> shape, for a model of this config (built on meta: free)."""
    with torch.device("meta"):
        model = Orion(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---- reading files safely ----------------------------------------------------------------------


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; give the folder holding config.json and the weights")


def read_json(path: Path) -> dict:
    """config.json or an index file."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs the config.json that came with its weights")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({first_line(e)}); restore the original file") from None


def remedy(folder: Path) -> str:
    """What to do about a missing or damaged weight file, by where its folder came from: a
    training run (train.py's train_state.pt beside it), a conversion or save (nano_orion's
    config.json), or a download (the released layout)."""
    if (folder / "train_state.pt").exists():
        return "train.py wrote this folder: resume from an earlier copy of it, or train again"
    try:
        ours = "nano_orion" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        ours = False
    return "write the checkpoint again (convert.py, or nano_orion.save)" if ours else "download this file again"


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .bin or .safetensors file, memory-mapped (nothing read until used)."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing; {remedy(path.parent)}")
    corrupt = f"{path}: truncated or corrupt ({{}}); {remedy(path.parent)}"
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(corrupt.format(first_line(e))) from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors, and unpickling them could run code; "
            "get the weights from a source you trust, preferably as .safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(corrupt.format(first_line(e))) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        found = type(tensors).__name__ if not isinstance(tensors, dict) else "a dict with non-tensor values"
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, found {found}; save a plain state_dict")
    return tensors


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
                    raise CheckpointError(f"{folder / file}: missing, but {index_name} lists it; {remedy(folder)}")
            return dict(sorted(files.items()))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return {single: None}
    raise CheckpointError(
        f"{folder}: no weights found; expected model*.safetensors or pytorch_model*.bin, with an index file if sharded"
    )


def check_tensor(path: Path, key: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(
            f"{path}: {key} has shape {tuple(tensor.shape)}, config.json implies {shape}; "
            "check that config.json belongs to these weights"
        )
    if tensor.dtype not in DTYPES.values():
        raise CheckpointError(
            f"{path}: {key} has unsupported dtype {tensor.dtype}; nano_orion reads {', '.join(DTYPES)} weights"
        )


def missing_tensors(folder: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{folder}: {len(names)} tensors missing, e.g. {', '.join(names[:3])}; "
        "the download is incomplete, fetch the weights again"
    )


# ---- reading nano_orion's own format ------------------------------------------------------------


def is_nano_checkpoint(folder) -> bool:
    check_folder(Path(folder))
    return "nano_orion" in read_json(Path(folder) / "config.json")


def read_nano(folder):
    """A nano_orion checkpoint folder -> (config, generator of (name, memory-mapped tensor))."""
    folder = Path(folder)
    check_folder(folder)
    path = folder / "config.json"
    try:
        config = OrionConfig.from_dict(read_json(path)["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a nano_orion config ({first_line(e)}); restore the original file") from None
    return config, _nano_tensors(folder, weight_files(folder), expected_shapes(config))


# nano_orion 0.1 named a layer's stacked experts layers.N.moe.w1 (w2, w3); they are read under
# today's names, layers.N.moe.experts.w1, so its checkpoints load as they are.
_EXPERTS_0_1 = re.compile(r"(layers\.\d+\.moe)\.(w[123])")


def _nano_tensors(folder, files, shapes):
    seen = set()
    for file in files:
        for name, tensor in read_weight_file(folder / file).items():
            if _EXPERTS_0_1.fullmatch(name):
                name = _EXPERTS_0_1.sub(r"\1.experts.\2", name)
            if name not in shapes:
                raise CheckpointError(
                    f"{folder / file}: unexpected tensor {name} for config.json's model; check that config.json "
                    "belongs to these weights"
                )
            check_tensor(folder / file, name, tensor, shapes[name])
            seen.add(name)
            yield name, tensor
    if missing := sorted(set(shapes) - seen):
        raise missing_tensors(folder, missing)


# ---- writing it ---------------------------------------------------------------------------------


def write_shards(tensors, folder: Path, max_shard_bytes: int) -> None:
    """Write (name, tensor) pairs, in order, as safetensors shards of at most max_shard_bytes
    (a larger tensor gets a shard of its own): model.safetensors if one is enough, else
    model-0000K-of-0000N.safetensors + model.safetensors.index.json. Holds one shard in memory."""
    shard, size, total, written = {}, 0, 0, []  # written: (temporary file, its tensor names)

    def flush():
        path = folder / f"shard-{len(written):05d}.partial"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    names = (
        ["model.safetensors"]
        if len(written) == 1
        else [f"model-{k:05d}-of-{len(written):05d}.safetensors" for k in range(1, len(written) + 1)]
    )
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
    (folder / "config.json").write_text(
        json.dumps({"nano_orion": FORMAT_VERSION, "config": config.to_dict()}, indent=2) + "\n"
    )


def is_checkpoint_file(name: str) -> bool:
    """A file of one save: config.json, the weights, the index, and train.py's train_state.pt
    (not the tokenizer, a log or other files). A new save never carries these over from the
    folder it replaces, so that weights never pair with another save's shards or state."""
    return (
        name in ("config.json", "model.safetensors", INDEX, "train_state.pt")
        or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None
    )


def _tensors_in(obj) -> list[torch.Tensor]:
    """The tensors inside nested dicts, lists and tuples (an optimizer's state_dict)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    return []


def space_needed(tensor_bytes: int, n_tensors: int, files=()) -> int:
    """Bytes a checkpoint of tensors and copied files takes on disk: the tensors, a margin of
    4 KiB per tensor for what the formats add around each (safetensors' header entry, the
    zip record and pickle of torch.save), the files, and 1 MiB for config.json and the index."""
    return tensor_bytes + 4096 * n_tensors + sum(Path(f).stat().st_size for f in files) + 2**20


def check_free_space(folder: Path, needed: int) -> None:
    """A one-line CheckpointError unless the disk holding `folder` (or the nearest folder above
    it that exists) has `needed` bytes free."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise CheckpointError(
            f"{folder}: the checkpoint needs about {gb(needed)} and the disk has {gb(free)} free; "
            "free some space or choose another folder"
        )


def _carry(src: Path, dst: Path) -> None:
    """A file or folder of the old checkpoint folder into the new one: hard links (the same file
    under a second name: no copy, and a log appended to later grows in both), else a copy."""

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:  # a filesystem without hard links (FAT, some network drives)
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy)
    else:
        link_or_copy(src, dst)


def save(
    model: Orion,
    folder,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    state_dict=None,
    tokenizer=None,
    extra: dict | None = None,
) -> None:
    """Write `model` as a nano_orion checkpoint into `folder` (created if needed), replacing the
    checkpoint there in one step: everything is written into a temporary folder beside it, which
    then swaps places with `folder` (atomic.atomic_folder). Whoever reads or copies `folder` finds
    the old checkpoint or the new one, each complete; a failure or a kill leaves the old one.

    state_dict: the weights (default: model.state_dict(); train.py passes the full one it gathers).
    tokenizer: a tokenizer.model file to copy in, with a tokenizer_config.json; without it the
        folder's tokenizer files stay.
    extra: file name -> object written with torch.save (train.py's train_state.pt).
    The folder's other files and folders (train.py's log.jsonl and lock) move into the new
    folder as hard links; its old weights, config.json, index and train_state.pt do not.
    The free space is checked first; a full disk is a one-line CheckpointError.
    """
    folder = Path(folder)
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = _tensors_in([state_dict, extra])
    needed = space_needed(
        sum(t.numel() * t.element_size() for t in tensors), len(tensors), [tokenizer] if tokenizer else []
    )
    check_free_space(folder, needed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder, replace=True) as staging:
        try:
            write_shards(state_dict.items(), staging, max_shard_bytes)
            write_config(staging, model.config)
            if tokenizer:
                shutil.copyfile(tokenizer, staging / "tokenizer.model")
                (staging / "tokenizer_config.json").write_text(
                    json.dumps({"add_bos_token": False, "add_eos_token": False}) + "\n"
                )
            for name, obj in (extra or {}).items():
                torch.save(obj, staging / name)
        except (OSError, SafetensorError, RuntimeError) as e:  # torch.save's full disk is a RuntimeError
            raise CheckpointError(
                f"{folder}: writing the checkpoint failed ({first_line(e)}); the previous checkpoint is unchanged"
            ) from None
        if folder.is_dir():
            for old in folder.iterdir():
                if not is_checkpoint_file(old.name) and not (staging / old.name).exists():
                    _carry(old, staging / old.name)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files `src` has into `dst`, where `dst` does not have them yet (small files)."""
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)


# ---- loading, on one device or several ----------------------------------------------------------


def assemble(config: OrionConfig, tensors, device, dtype) -> Orion:
    """An Orion model whose parameters are `tensors` ((name, tensor) pairs), on `device`
    (one, a list, or "auto": see placement.placement) in `dtype`."""
    try:
        where = placement(config, expected_shapes(config), device, dtype)
    except ValueError as e:  # the devices are too small
        raise CheckpointError(str(e)) from None
    state = {name: t.to(device=where[module_of(name)], dtype=dtype) for name, t in tensors}
    with torch.device("meta"):
        model = Orion(config)
    model.load_state_dict(state, strict=True, assign=True)  # the tensors become the parameters
    model.init_rope(where["embed"])
    if len(set(where.values())) > 1:  # split over devices: each module moves its inputs to its own
        place(model, where)
    return model.eval()


@torch.no_grad()
def load_nano(folder, device="cpu", dtype=torch.float32) -> Orion:
    """Build an Orion model from a nano_orion checkpoint folder; weights already of the
    requested dtype stay memory-mapped on the CPU (no copy)."""
    config, tensors = read_nano(folder)
    return assemble(config, tensors, device, dtype)
