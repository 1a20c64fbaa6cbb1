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

Saving replaces a folder's checkpoint at once (`saving`): readers see the old or the new one.
"""

import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_folder
from .config import DTYPES, OrionConfig
from .model import Orion
from .placement import module_of, place, placement

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # largest weight file written: 5 GB, as the released checkpoint's shards
COMMITTED = ".committed"  # a complete new checkpoint inside its folder, being put in place (`saving`)


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
                    raise CheckpointError(f"{folder / file}: missing, but {index_name} lists it; download this shard again")
            return dict(sorted(files.items()))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return {single: None}
    raise CheckpointError(f"{folder}: no weights found; expected model*.safetensors or pytorch_model*.bin, "
                          "with an index file if sharded")


def check_tensor(path: Path, key: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, config.json implies {shape}; "
                              "check that config.json belongs to these weights")
    if tensor.dtype not in DTYPES.values():
        raise CheckpointError(f"{path}: {key} has unsupported dtype {tensor.dtype}; nano_orion reads {', '.join(DTYPES)} weights")


def missing_tensors(folder: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(f"{folder}: {len(names)} tensors missing, e.g. {', '.join(names[:3])}; "
                           "the download is incomplete, fetch the weights again")


# ---- reading nano_orion's own format ------------------------------------------------------------


def checkpoint_dir(folder) -> Path:
    """Where a reader finds `folder`'s newest complete checkpoint: `folder` itself, or its
    .committed/ while a save past its commit point is still being put in place (`saving`)."""
    folder = Path(folder)
    return folder / COMMITTED if (folder / COMMITTED).is_dir() else folder


def is_nano_checkpoint(folder) -> bool:
    check_folder(Path(folder))
    return "nano_orion" in read_json(Path(folder) / "config.json")


def read_nano(folder):
    """A nano_orion checkpoint folder -> (config, generator of (name, memory-mapped tensor))."""
    folder = checkpoint_dir(folder)
    check_folder(folder)
    path = folder / "config.json"
    try:
        config = OrionConfig.from_dict(read_json(path)["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a nano_orion config ({first_line(e)}); restore the original file") from None
    return config, _nano_tensors(folder, weight_files(folder), expected_shapes(config))


def _nano_tensors(folder, files, shapes):
    seen = set()
    for file in files:
        for name, tensor in read_weight_file(folder / file).items():
            if name not in shapes:
                raise CheckpointError(f"{folder / file}: unexpected tensor {name} for config.json's model; check that config.json belongs to these weights")
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
    """A file of one save: config.json, the weights, the index, and train.py's train_state.pt
    (not the tokenizer or other files). Files of this kind that a newer save lacks (shards of
    other sharding; the optimizer state of a training save overwritten by a plain `save`) are
    stale and get removed, so that weights never pair with another save's state."""
    return (name in ("config.json", "model.safetensors", INDEX, "train_state.pt")
            or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None)


@contextmanager
def saving(folder):
    """Yield an empty staging folder inside `folder` (created if needed); what the block writes
    there replaces `folder`'s checkpoint at once (other files, such as logs, stay). With copies
    of the tokenizer files, one rename makes it folder/.committed/: the commit point, from which
    readers read it (`checkpoint_dir`) while `finish_save` links its files into `folder`. A kill
    before the commit point changes nothing (the next save removes the staging folder); a kill
    after it is finished by the next save."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_save(folder)  # an earlier save killed after its commit point
    with atomic_folder(folder / COMMITTED) as staging:
        yield staging
        copy_tokenizer(folder, staging)
    finish_save(folder)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files `src` has into `dst`, where `dst` does not have them yet (small files)."""
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)


def finish_save(folder) -> None:
    """Put a committed save in place: link its files into `folder`, delete the checkpoint files it
    lacks (an earlier save's shards or index), remove folder/.committed/. Safe to repeat after a kill."""
    folder = Path(folder)
    committed = folder / COMMITTED
    if not committed.is_dir():
        return
    new = {f.name for f in committed.iterdir()}
    for f in folder.iterdir():
        if is_checkpoint_file(f.name) and f.name not in new:
            f.unlink()
    for name in sorted(new):
        (folder / name).unlink(missing_ok=True)
        try:
            os.link(committed / name, folder / name)  # a second name for the same file: no copy
        except OSError:  # a filesystem without hard links (FAT, some network drives)
            shutil.copyfile(committed / name, folder / name)
    shutil.rmtree(committed)


def save(model: Orion, folder, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `model` as a nano_orion checkpoint into `folder` (created if needed), replacing
    the checkpoint there at once (`saving`); other files in `folder` stay."""
    with saving(folder) as staging:
        write_shards(model.state_dict().items(), staging, max_shard_bytes)
        write_config(staging, model.config)


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
