"""Splitting the model over several devices, pipeline style.

`placement` decides where each module goes: the embedding, then consecutive runs of layers,
then the final norm with the head, each device taking a share of the bytes in proportion to
its free memory (`plan_placement`, a pure function, tested without GPUs). `place` puts the
modules there and has each move its inputs to its own device before it runs (a forward
pre-hook), so the residual stream hops from one device to the next and the model's code
knows nothing of devices: two 80 GB GPUs hold the 96 GB of bf16 weights.
"""

import os
from functools import partial
from itertools import accumulate

import torch
from torch import nn

from .config import OrionConfig


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def plan_placement(sizes: list[int], capacities: list[int]) -> list[int]:
    """Split a pipeline of parts (embedding, layer 0, ..., layer N-1, final norm + head),
    sizes in bytes, into consecutive runs, one per device, each device taking a share of
    the bytes proportional to its capacity (a part goes to the device whose share holds
    its middle byte). -> the device index of each part. ValueError if a device would overflow."""
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
            raise ValueError(
                f"the model needs {gb(total)}, the devices offer {gb(room)} ({', '.join(gb(c) for c in capacities)}), "
                f"and device {d} would need {gb(load)}; use more or larger GPUs or a smaller dtype"
            )
    return plan


def free_bytes(device: torch.device) -> int:
    """What a device offers the weights: 90% of a GPU's free memory, or the CPU's available RAM."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])  # 10% left for the KV cache and activations
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def module_of(name: str) -> str:
    """The module a parameter is placed with: "embed", "layers.N", "norm" or "lm_head"."""
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]


def placement(config: OrionConfig, shapes: dict[str, tuple], device, dtype: torch.dtype) -> dict[str, torch.device]:
    """Module name ("embed", "layers.N", "norm", "lm_head") -> device, for a model of this
    config whose parameters have these shapes (checkpoint.expected_shapes). `device` is one
    device, a list of them (layers split in proportion to their free memory), or "auto":
    every visible GPU, else the CPU."""
    if isinstance(device, str) and device == "auto":
        device = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or "cpu"
    modules = ["embed"] + [f"layers.{i}" for i in range(config.n_layers)] + ["norm", "lm_head"]
    if not isinstance(device, (list, tuple)):
        return dict.fromkeys(modules, torch.device(device))
    devices = [torch.device(d) for d in device]
    sizes = dict.fromkeys(modules, 0)
    for name, shape in shapes.items():
        sizes[module_of(name)] += torch.Size(shape).numel() * dtype.itemsize
    parts = [[m] for m in modules[:-2]] + [modules[-2:]]  # the final norm and the head stay together
    plan = plan_placement([sum(sizes[m] for m in part) for part in parts], [free_bytes(d) for d in devices])
    return {m: devices[d] for part, d in zip(parts, plan) for m in part}


def _inputs_to(device: torch.device, module: nn.Module, args: tuple, kwargs: dict):
    """A forward pre-hook: the module's tensor arguments, moved to `device`; the rest as they are."""

    def move(a):
        return a.to(device) if isinstance(a, torch.Tensor) else a

    return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}


def place(model: nn.Module, where: dict[str, torch.device]) -> None:
    """Move each module of `where` (module name -> device, from `placement`) to its device,
    and have it move its tensor inputs there before it runs. The model's own inputs go to the
    embedding's device, where the RoPE tables are. The hooks stay with the modules: a model
    placed on several devices is not meant to be moved again (model.to would leave them behind)."""
    for name, device in where.items():
        module = model.get_submodule(name)
        module.to(device)
        module.register_forward_pre_hook(partial(_inputs_to, device), with_kwargs=True)
    model.register_forward_pre_hook(partial(_inputs_to, where["embed"]), with_kwargs=True)
