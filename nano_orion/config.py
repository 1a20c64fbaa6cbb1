"""The model's shape in one dataclass.

Every size in nano_orion comes from an `OrionConfig`: the number of layers, heads,
experts, the vocabulary. Two named presets are built in:

* ``"orion-moe-8x7b"``: the released Orion-MoE8x7B (48.2 B parameters, 13.3 B active per token);
* ``"toy"``: the same architecture shrunk until it trains in minutes on two CPU cores.

`OrionConfig.from_hf_config` reads the released ``config.json`` (Mixtral's key names);
`to_hf_config` writes it back. nano_orion's own checkpoints store `to_dict()`.

One thing ``config.json`` does not say is which normalisation the model uses (see
docs/09_loading.md): LayerNorm with bias, as in Orion-14B, or RMSNorm, as in Mixtral.
The loaders decide it from the checkpoint's tensors (a ``.bias`` beside the norm weights
means LayerNorm) and pass it in as ``norm_type``.
"""

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

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
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_experts", "top_k", "max_seq_len"):
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

    # ---- the released (Hugging Face) config.json ------------------------------------

    @classmethod
    def from_hf_config(cls, src, norm_type: str | None = None) -> "OrionConfig":
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
        implemented = {  # what nano_orion implements, as in the released model
            "rope_scaling": None,
            "sliding_window": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "head_dim": src["hidden_size"] // src["num_attention_heads"],
        }
        for key, supported in implemented.items():
            if src.get(key) not in (None, supported):
                raise ValueError(f"config.json has {key}={src[key]!r}; nano_orion implements only {supported!r}, as in the released model")
        values = {ours: src[theirs] for ours, theirs in _HF_KEYS.items()}
        values["n_kv_heads"] = src.get("num_key_value_heads") or values["n_heads"]
        values["max_seq_len"] = src.get("max_position_embeddings", cls.max_seq_len)
        values["router_aux_loss_coef"] = src.get("router_aux_loss_coef", cls.router_aux_loss_coef)
        for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
            if src.get(theirs) is not None:
                values[ours] = src[theirs]
        values["norm_type"] = norm_type or src.get("norm_type", "layernorm")
        return cls(**values)

    def to_hf_config(self) -> dict:
        """The released ``config.json`` for this model, plus a ``norm_type`` key of ours."""
        d = dict(_HF_TEMPLATE)
        d.update({theirs: getattr(self, ours) for ours, theirs in _HF_KEYS.items()})
        d.update(
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.max_seq_len,
            max_sequence_length=self.max_seq_len,
            router_aux_loss_coef=self.router_aux_loss_coef,
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            norm_type=self.norm_type,
        )
        return d


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
