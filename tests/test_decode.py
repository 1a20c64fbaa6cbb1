"""Decoding as GPUs run it: any output strides, the position as a tensor, a compiled step.

No GPU is needed to catch these paths' bugs: SDPA is made to return CUDA-like strides, the
position is the device tensor the compiled step reads, and torch.compile runs on the CPU
(where it cannot use CUDA graphs, but traces and fuses the same single graph). The CPU's own
compiled step, compiled ahead of time (aot.py), is checked the same way, and for what it checks
by hand at each generation's first step.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import nano_orion
from nano_orion import Orion, OrionConfig, aot
from nano_orion.quantize import quantize_model
from nano_orion.sampler import ORION_DEMO, compile_decode_step, generate, left_pad

from conftest import DEVICE, FIXTURES, random_model

SDPA = F.scaled_dot_product_attention


def sdpa_with_cuda_strides(*args, **kwargs):
    """SDPA's values in the layout CUDA's kernels return: (B, T, heads, head_dim) in memory."""
    y = SDPA(*args, **kwargs)
    return y.transpose(1, 2).contiguous().transpose(1, 2)


def test_attention_does_not_assume_the_cpus_output_strides():
    """CUDA's SDPA kernels return other strides than the CPU's; a .view of their output once
    crashed every float32 decoding step on a GPU. Prefill, decode and a full pass agree."""
    model, tok = nano_orion.load(FIXTURES / "orion-mini-rmsnorm", device=DEVICE)
    idx = torch.tensor([tok.encode("The experts of 位置 and their router")], device=DEVICE)
    expected_ids, expected_logits = generate(model, idx, 6), model(idx)
    with mock.patch.object(F, "scaled_dot_product_attention", sdpa_with_cuda_strides):
        assert torch.equal(generate(model, idx, 6), expected_ids)
        torch.testing.assert_close(model(idx), expected_logits)


def test_position_as_a_tensor_equals_position_as_an_int():
    model = random_model(OrionConfig.preset("toy", n_layers=2, vocab_size=97, max_seq_len=64), seed=3).to(DEVICE)
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    pad_mask = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    pad_mask[1, :3] = False
    with torch.no_grad():
        logits = []
        for start_pos in (6, torch.tensor(6, device=DEVICE)):
            cache = model.new_cache(2, 12)
            model(idx[:, :6], cache=cache, pad_mask=pad_mask[:, :6])
            logits.append(model(idx[:, 6:], cache=cache, start_pos=start_pos, pad_mask=pad_mask))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def sampled_runs(model, runs, decode_step=None):
    """The tokens of each (prompts, n): n tokens sampled with the demo's settings, seeded."""
    outputs = []
    for prompts, n in runs:
        idx, pad_mask = left_pad(prompts, 0, DEVICE)
        g = torch.Generator(DEVICE).manual_seed(0)
        pad_mask = None if pad_mask.all() else pad_mask
        outputs.append(
            generate(model, idx, n, ORION_DEMO, pad_mask=pad_mask, generator=g, decode_step=decode_step).tolist()
        )
    return outputs


def compiled_runs(model, runs, ahead_of_time):
    """sampled_runs through one compiled decoding step, and the number of graphs compiled
    (for the ahead-of-time step: libraries, one graph each)."""
    before = counters["stats"]["unique_graphs"]
    with mock.patch.object(aot, "compile_library", wraps=aot.compile_library) as compile_library:
        outputs = sampled_runs(model, runs, compile_decode_step(model, ahead_of_time=ahead_of_time))
    return outputs, compile_library.call_count if ahead_of_time else counters["stats"]["unique_graphs"] - before


@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["ahead-of-time", "torch.compile"])
def test_compiled_decoding_equals_eager_and_compiles_once_per_shape_kind(ahead_of_time):
    """A compiled step (one graph: torch.compile's fullgraph=True and torch.export refuse graph
    breaks) gives the eager tokens, sampled with the demo's settings, for float and int8
    weights; generations of other lengths reuse it (the cache's length is dynamic): one graph
    for all."""
    if ahead_of_time and DEVICE != "cpu":
        pytest.skip("the ahead-of-time step is the CPU's")
    model = random_model(OrionConfig.preset("toy", n_layers=2, vocab_size=97, max_seq_len=64), seed=4).to(DEVICE)
    runs = [([[5, 6, 7, 8]], 6), ([[9, 10, 11, 12, 13, 14]], 9), ([[3, 4, 5]], 12), ([[3, 4]], 15)]
    outputs, graphs = compiled_runs(model, runs, ahead_of_time)
    assert outputs == sampled_runs(model, runs)
    assert graphs == 1
    int8 = quantize_model(model)
    padded = [([[5, 6, 7, 8], [9, 10]], 6), ([[5, 6, 7], [9, 10, 11, 12, 13]], 9)]  # left-padded batches of two
    outputs, graphs = compiled_runs(int8, padded, ahead_of_time)
    assert outputs == sampled_runs(int8, padded)
    assert graphs == 2  # the warm-up's batch of one, and batches of two with padding


def test_compiled_step_skips_guards_only_after_a_generations_first_step(monkeypatch):
    """Within a generation the compiled step runs without its guards; each generation's first
    step checks them, so a model quantized in place after the first generation compiles anew
    and gives int8's eager tokens, not float32's graph fed int8 weights."""
    model = random_model(OrionConfig.preset("toy", n_layers=2, vocab_size=97, max_seq_len=64), seed=5).to(DEVICE)
    step = compile_decode_step(model, ahead_of_time=False)
    stances = []  # skip_guard_eval_unsafe of each stance the step sets
    set_stance = torch.compiler.set_stance

    def recorded(*args, **kwargs):
        stances.append(kwargs.get("skip_guard_eval_unsafe", False))
        return set_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recorded)
    idx = torch.tensor([[5, 6, 7]], device=DEVICE)
    assert torch.equal(generate(model, idx, 5, decode_step=step), generate(model, idx, 5))
    assert stances == [True] * 3  # 4 decoding steps: the first checks the guards, the next 3 skip them
    int8 = quantize_model(model)
    assert torch.equal(generate(int8, idx, 5, decode_step=step), generate(int8, idx, 5))
    assert stances == [True] * 6


def test_ahead_of_time_step_compiles_anew_for_a_changed_model_and_reads_weights_changed_in_place():
    """The ahead-of-time step checks at each generation's first step what its guards would:
    a model quantized in place compiles a new library and gives int8's eager tokens; weights
    changed in place are read as they are, with no new library; and each step leaves the
    model's routing as an eager step does."""
    model = random_model(OrionConfig.preset("toy", n_layers=2, vocab_size=97, max_seq_len=64), seed=5)
    idx = torch.tensor([[5, 6, 7]])
    with mock.patch.object(aot, "compile_library", wraps=aot.compile_library) as compile_library:
        step = compile_decode_step(model, ahead_of_time=True)
        before = generate(model, idx, 5, decode_step=step)
        assert torch.equal(before, generate(model, idx, 5))
        eager_routing = model.routing()
        generate(model, idx, 5, decode_step=step)
        for (probs, experts), (eager_probs, eager_experts) in zip(model.routing(), eager_routing, strict=True):
            torch.testing.assert_close(probs, eager_probs)
            assert torch.equal(experts, eager_experts)
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)  # in place: the library reads the new values
        after = generate(model, idx, 5, decode_step=step)
        assert torch.equal(after, generate(model, idx, 5)) and not torch.equal(after, before)
        assert compile_library.call_count == 1
        int8 = quantize_model(model)
        assert torch.equal(generate(int8, idx, 5, decode_step=step), generate(int8, idx, 5))
        assert compile_library.call_count == 2


def test_ahead_of_time_step_is_the_cpus():
    model = Orion(OrionConfig.preset("toy", n_layers=1)).to("meta")
    with pytest.raises(ValueError, match="runs on the CPU; the model is on meta"):
        compile_decode_step(model, ahead_of_time=True)
