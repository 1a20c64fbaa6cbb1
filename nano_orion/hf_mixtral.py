"""The same weights in transformers' `MixtralForCausalLM`: the independent reference.

Tests compare nano_orion against it, and benchmarks race it. transformers is not a
runtime dependency of nano_orion: install the ``test`` extra to use this module.

transformers (5.x) stores each layer's experts fused: ``mlp.experts.gate_up_proj``
(n_experts, 2 ffn_dim, dim) holds w1's rows then w3's rows, ``mlp.experts.down_proj``
(n_experts, dim, ffn_dim) is w2, and the router is ``mlp.gate.weight``. Mixtral has
RMSNorm; for a LayerNorm model its three kinds of norm modules are swapped for
``nn.LayerNorm`` with bias.
"""

import torch
from torch import nn

from .model import Orion


def to_mixtral(model: Orion, attn_implementation: str = "eager"):
    """A transformers MixtralForCausalLM computing the same function as `model`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = model.config
    hf_config = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        num_local_experts=c.n_experts,
        num_experts_per_tok=c.top_k,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len,
        router_aux_loss_coef=c.router_aux_loss_coef,
        bos_token_id=c.bos_id,
        eos_token_id=c.eos_id,
        pad_token_id=c.pad_id,
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = attn_implementation
    dtype = model.embed.weight.dtype  # not lm_head: int8 after quantize_model
    with torch.device("meta"):
        hf = MixtralForCausalLM(hf_config)
    if c.norm_type == "layernorm":
        for layer in hf.model.layers:
            layer.input_layernorm = nn.LayerNorm(c.dim, eps=c.norm_eps, device="meta")
            layer.post_attention_layernorm = nn.LayerNorm(c.dim, eps=c.norm_eps, device="meta")
        hf.model.norm = nn.LayerNorm(c.dim, eps=c.norm_eps, device="meta")

    state = {"model.embed_tokens.weight": model.embed.weight, "lm_head.weight": model.lm_head.weight}
    for part, t in model.norm.state_dict().items():
        state[f"model.norm.{part}"] = t
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        for x in "qkvo":
            state[p + f"self_attn.{x}_proj.weight"] = getattr(block.attn, f"w{x}").weight
        for ours, theirs in ((block.attn_norm, "input_layernorm"), (block.moe_norm, "post_attention_layernorm")):
            for part, t in ours.state_dict().items():
                state[p + f"{theirs}.{part}"] = t
        state[p + "mlp.gate.weight"] = block.moe.router.weight
        state[p + "mlp.experts.gate_up_proj"] = torch.cat([block.moe.experts.w1, block.moe.experts.w3], dim=1)
        state[p + "mlp.experts.down_proj"] = block.moe.experts.w2
    state = {k: v.detach().clone().to(dtype) for k, v in state.items()}
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)  # its inv_freq buffer, off the meta device
    return hf.to(model.embed.weight.device).eval()
