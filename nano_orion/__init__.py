"""nano_orion: a small, readable PyTorch implementation of the Orion-MoE8x7B language model."""

from pathlib import Path

import torch

from .checkpoint import CheckpointError, is_nano_checkpoint, load_nano, save
from .config import OrionConfig
from .conversation import chat
from .fast import accelerate
from .hf_layout import load_hf
from .model import Orion
from .sampler import SamplingConfig, generate
from .tokenizer import Tokenizer


def load(path, device="cpu", dtype=torch.float32):
    """Load a checkpoint folder, nano_orion's own or the released Hugging Face layout, -> (model, tokenizer).

    device: "cpu", "cuda", "cuda:1", ...; a list of devices, or "auto" (every visible GPU),
        to split the layers across them, pipeline style, in proportion to their free memory.
    dtype: the parameters' dtype. A nano_orion checkpoint already stored in it loads on the
        CPU without copying (the parameters are the memory-mapped file).
    tokenizer is None if the folder has no tokenizer.model. Problems raise CheckpointError.
    The model's experts are the fast ones (fast.accelerate), ready to generate or train;
    Orion(config) builds the plain model of the lesson.
    """
    path = Path(path)
    if is_nano_checkpoint(path):
        model = load_nano(path, device=device, dtype=dtype)
    else:
        model = load_hf(path, device=device, dtype=dtype)
    accelerate(model)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.model").exists() else None
    return model, tokenizer


__all__ = ["OrionConfig", "Orion", "load", "save", "generate", "chat", "SamplingConfig", "Tokenizer", "CheckpointError"]
