"""Configurations: presets, the released config.json, sizes, and building on the meta device."""

import json
import resource

import pytest
import torch
from hypothesis import given, settings

from nano_orion import Orion, OrionConfig
from nano_orion.hf_layout import config_from_hf, config_to_hf

from conftest import FIXTURES, small_configs


@pytest.mark.parametrize("norm_type, expected", [("layernorm", 48_177_356_800), ("rmsnorm", 48_177_090_560)])
def test_real_config_builds_on_meta_with_the_published_parameter_count(norm_type, expected):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = Orion(OrionConfig.preset("orion-moe-8x7b", norm_type=norm_type))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected  # counts from ../shared/ORION.md
    assert OrionConfig.preset("orion-moe-8x7b", norm_type=norm_type).n_params() == expected
    # No weight memory: 48 B parameters would be 96 GB; the process grew by far less than 1 GB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1_000_000  # KiB


def test_real_config_sizes():
    c = OrionConfig.preset("orion-moe-8x7b")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (4096, 32, 32, 8, 128)
    assert (c.n_experts, c.top_k, c.ffn_dim, c.vocab_size, c.rope_theta) == (8, 2, 14592, 113664, 1e6)
    assert c.n_active_params() == 13_284_409_344  # ORION.md
    assert c.kv_cache_bytes_per_token() == 128 * 1024


@settings(max_examples=25, deadline=None)
@given(small_configs())
def test_n_params_matches_the_built_model(config):
    with torch.device("meta"):
        model = Orion(config)
    assert config.n_params() == sum(p.numel() for p in model.parameters())


def test_config_from_hf_reads_the_released_keys():
    raw = json.loads((FIXTURES / "orion-mini-rmsnorm" / "config.json").read_text())
    c = config_from_hf(FIXTURES / "orion-mini-rmsnorm", norm_type="rmsnorm")
    assert (c.vocab_size, c.dim, c.n_layers) == (raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"])
    assert (c.n_heads, c.n_kv_heads, c.ffn_dim) == (
        raw["num_attention_heads"],
        raw["num_key_value_heads"],
        raw["intermediate_size"],
    )
    assert (c.n_experts, c.top_k) == (raw["num_local_experts"], raw["num_experts_per_tok"])
    assert (c.rope_theta, c.norm_eps, c.max_seq_len) == (
        raw["rope_theta"],
        raw["rms_norm_eps"],
        raw["max_position_embeddings"],
    )
    assert (c.bos_id, c.eos_id, c.pad_id) == (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"])
    assert config_from_hf(config_to_hf(c)) == c
    assert OrionConfig.from_dict(c.to_dict()) == c


def test_bad_configs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        OrionConfig(n_heads=6, n_kv_heads=4, dim=48)
    with pytest.raises(ValueError, match="top_k"):
        OrionConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="norm_type"):
        OrionConfig(norm_type="batchnorm")
    with pytest.raises(ValueError, match="unknown preset"):
        OrionConfig.preset("gpt-5")
    raw = json.loads((FIXTURES / "orion-mini-rmsnorm" / "config.json").read_text())
    with pytest.raises(ValueError, match="hidden_size"):
        config_from_hf({k: v for k, v in raw.items() if k != "hidden_size"})
    for key, value in [
        ("hidden_act", "gelu"),
        ("attention_bias", True),
        ("tie_word_embeddings", True),
        ("head_dim", 32),
    ]:
        with pytest.raises(ValueError, match=key):
            config_from_hf({**raw, key: value})
    assert config_from_hf({**raw, "head_dim": 16}).head_dim == 16  # consistent: accepted
