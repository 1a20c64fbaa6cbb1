"""What a command line's --device means, as a torch.device.

    cpu      the CPU
    cuda     the current GPU: cuda:0, or under torchrun with several processes the GPU of
             the process's LOCAL_RANK
    cuda:N   GPU N (one process only: several would share it)
    auto     cuda if a GPU is visible, else cpu

A CUDA answer always carries its index, which torch.cuda.set_device and the process group
need. A device that is not there is a ValueError whose one-line message names the fix.
"""

import torch

CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str, local_rank: int | None = None, cuda_count: int | None = None) -> torch.device:
    """The torch.device that --device `name` means: cpu, or cuda with an index.

    local_rank: this process's LOCAL_RANK when torchrun started several processes, else None.
    cuda_count: how many GPUs are visible; default torch.cuda.device_count() (0 without CUDA).
    """
    if cuda_count is None:
        cuda_count = torch.cuda.device_count()
    if name == "auto":
        name = "cuda" if cuda_count > 0 else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use {CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{name}: nano_orion runs on cpu or cuda; use {CHOICES}")
    if cuda_count == 0:
        raise ValueError(f"{name}: no CUDA device here; use --device cpu")
    gpus = "1 GPU (cuda:0)" if cuda_count == 1 else f"{cuda_count} GPUs (cuda:0 to cuda:{cuda_count - 1})"
    if device.index is not None:
        if local_rank is not None:
            raise ValueError(f"{name}: each of torchrun's processes takes the GPU of its LOCAL_RANK; use --device cuda")
        if device.index >= cuda_count:
            raise ValueError(f"{name}: this machine shows {gpus}; pick one of them")
        return device
    if local_rank is None:
        return torch.device("cuda", 0)
    if local_rank >= cuda_count:
        raise ValueError(
            f"{name}: LOCAL_RANK {local_rank} has no GPU, this machine shows {gpus}; "
            f"start at most {cuda_count} processes per machine (torchrun --nproc_per_node {cuda_count})"
        )
    return torch.device("cuda", local_rank)
