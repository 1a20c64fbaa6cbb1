"""resolve_device: what --device means, for one process and for torchrun's several, with
and without GPUs (the GPU count is an argument, so no GPU is needed)."""

import pytest
import torch

from nano_orion.device import resolve_device

CPU = torch.device("cpu")


def gpu(index: int) -> torch.device:
    return torch.device("cuda", index)


@pytest.mark.parametrize(
    "name, local_rank, gpus, expected",
    [
        ("cpu", None, 0, CPU),
        ("cpu", None, 2, CPU),
        ("cpu", 1, 2, CPU),  # cpu stays cpu, with or without GPUs
        ("auto", None, 0, CPU),
        ("auto", 3, 0, CPU),  # auto without a GPU: the CPU, in every process
        ("auto", None, 2, gpu(0)),
        ("cuda", None, 2, gpu(0)),  # one process: the first GPU
        ("cuda:1", None, 2, gpu(1)),  # an index, as typed
        ("auto", 1, 2, gpu(1)),
        ("cuda", 1, 2, gpu(1)),  # several processes: the LOCAL_RANK's GPU
    ],
)
def test_the_device_each_name_means(name, local_rank, gpus, expected):
    device = resolve_device(name, local_rank=local_rank, cuda_count=gpus)
    assert device == expected and (device.type == "cpu" or device.index is not None)


@pytest.mark.parametrize(
    "name, local_rank, gpus, message",
    [
        ("cuda", None, 0, "cuda: no CUDA device here; use --device cpu"),
        ("cuda:0", 1, 0, "cuda:0: no CUDA device here; use --device cpu"),
        ("cuda:2", None, 2, "cuda:2: this machine shows 2 GPUs (cuda:0 to cuda:1); pick one of them"),
        ("cuda:1", None, 1, "cuda:1: this machine shows 1 GPU (cuda:0); pick one of them"),
        ("cuda:1", 0, 2, "cuda:1: each of torchrun's processes takes the GPU of its LOCAL_RANK; use --device cuda"),
        (
            "cuda",
            2,
            2,
            "cuda: LOCAL_RANK 2 has no GPU, this machine shows 2 GPUs (cuda:0 to cuda:1); "
            "start at most 2 processes per machine (torchrun --nproc_per_node 2)",
        ),
        ("gpu", None, 1, "'gpu' is not a device; use cpu, cuda, cuda:N or auto"),
        ("cuda:x", None, 1, "'cuda:x' is not a device; use cpu, cuda, cuda:N or auto"),
        ("mps", None, 0, "mps: nano_orion runs on cpu or cuda; use cpu, cuda, cuda:N or auto"),
    ],
)
def test_a_device_that_is_not_there_is_a_one_line_error(name, local_rank, gpus, message):
    with pytest.raises(ValueError) as error:
        resolve_device(name, local_rank=local_rank, cuda_count=gpus)
    assert str(error.value) == message


def test_the_gpu_count_defaults_to_torchs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == torch.device("cpu")
