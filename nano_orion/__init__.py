"""nano_orion: a small, readable PyTorch implementation of the Orion-MoE8x7B language model."""

from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_hf
from .config import OrionConfig
from .model import Orion
from .sampler import generate
from .tokenizer import Tokenizer


def load(path, device="cpu", dtype=torch.float32):
    """Load a checkpoint folder -> (model, tokenizer). tokenizer is None if the folder has no tokenizer.model."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json; point at a checkpoint folder")
    model = load_hf(path, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.model").exists() else None
    return model, tokenizer


__all__ = ["OrionConfig", "Orion", "load", "generate", "Tokenizer", "CheckpointError"]
