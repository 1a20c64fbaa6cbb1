"""The model's settings: its shape in one dataclass, the presets, the dtypes.

Every size in nano_orion comes from an `OrionConfig`: the number of layers, heads,
experts, the vocabulary. Two named presets are built in:

* ``"orion-moe-8x7b"``: the released Orion-MoE8x7B (48.2 B parameters, 13.3 B active per token);
* ``"toy"``: the same architecture shrunk until it trains in minutes on two CPU cores.

nano_orion's own checkpoints store `to_dict()`; the released ``config.json``, under
Mixtral's key names, is translated in hf_layout.py. `DTYPES` names the dtypes weights are
stored and computed in.

``norm_type`` is LayerNorm with bias, as in Orion-14B, or RMSNorm, as in Mixtral; for the
released weights the loaders decide it from the checkpoint's tensors (docs/09_loading.md).
"""

from dataclasses import asdict, dataclass, fields, replace

import torch

NORM_TYPES = ("layernorm", "rmsnorm")
# The dtypes nano_orion stores and computes weights in, by the names the command lines take.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class OrionConfig:
    vocab_size: int = 113664
    dim: int = 4096  # model width, "hidden_size"
    n_layers: int = 32
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads, shared by n_heads // n_kv_heads query heads each
    ffn_dim: int = 14592  # hidden width of one expert, "intermediate_size"
    n_experts: int = 8
    top_k: int = 2  # experts chosen per token
    rope_theta: float = 1_000_000.0
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    router_aux_loss_coef: float = 0.01
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def __post_init__(self):
        problems = []
        if self.norm_type not in NORM_TYPES:
            problems.append(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_dim",
            "n_experts",
            "top_k",
            "max_seq_len",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif self.head_dim % 2:
                problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
            if self.top_k > self.n_experts:
                problems.append(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        if problems:
            raise ValueError("invalid OrionConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    # ---- sizes, computed from the shape ----------------------------------------------

    def _attention_params(self) -> int:
        return self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)  # wq, wo; wk, wv

    def n_params(self) -> int:
        """Every parameter of the model (equals the sum of its tensors' sizes)."""
        attn = self._attention_params()
        router = self.dim * self.n_experts
        experts = self.n_experts * 3 * self.dim * self.ffn_dim  # w1, w3, w2
        norm = self.dim * (2 if self.norm_type == "layernorm" else 1)  # weight (+ bias)
        per_layer = attn + router + experts + 2 * norm
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + norm  # + embed, lm_head, final norm

    def n_active_params(self) -> int:
        """Weights one token multiplies through: attention, router and top_k experts per layer,
        plus lm_head (the embedding is a lookup, the norms are negligible)."""
        per_layer = self._attention_params() + self.dim * self.n_experts + self.top_k * 3 * self.dim * self.ffn_dim
        return self.n_layers * per_layer + self.vocab_size * self.dim

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Keys and values of one token in every layer (2 bytes each in fp16/bf16)."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * bytes_per_value

    # ---- presets -------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "OrionConfig":
        """A named configuration, optionally with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    # ---- nano_orion's own config.json -------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OrionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OrionConfig keys: {unknown}")
        return cls(**d)


PRESETS = {
    "orion-moe-8x7b": OrionConfig(),
    # 4.4 M parameters (1.5 M active per token): a few hundred steps on 2 CPU cores show learning.
    "toy": OrionConfig(
        vocab_size=4096,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=256,
        n_experts=8,
        top_k=2,
        max_seq_len=512,
    ),
}
