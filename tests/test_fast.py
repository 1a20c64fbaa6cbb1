"""The faster ways to run the experts (fast.py) against the plain ones, and where they are chosen."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nano_orion.fast
from nano_orion import Orion, OrionConfig
from nano_orion.fast import (
    FastExperts,
    FastLinear,
    accelerate,
    accelerate_linears,
    grouped_mm_dtype,
    moe_gathered,
    moe_grouped_mm,
    moe_one_token,
)
from nano_orion.moe import Experts, moe_reference, route
from nano_orion.quantize import Int8Experts, Int8Linear, quantize_model

from conftest import assert_same_with_gradients
from test_moe import random_experts, routing_problems

# Whether this torch runs F.grouped_mm on the CPU (from 2.13, which make test installs; a GPU
# machine's python may be older).
CPU_GROUPED_MM = grouped_mm_dtype(torch.zeros(1, 16), 24, compiling=False) is not None


@pytest.mark.skipif(not CPU_GROUPED_MM, reason="F.grouped_mm runs on the CPU from torch 2.13")
@settings(max_examples=40, deadline=None)
@given(routing_problems(), st.sampled_from([4, 16]), st.sampled_from([8, 20]))
def test_grouped_mm_equals_reference_loop(problem, dim, ffn_dim):
    """One F.grouped_mm per projection: values and gradients of the reference loop."""
    logits, top_k, g = problem
    N, E = logits.shape
    x = torch.randn(N, dim, generator=g, requires_grad=True)
    w1, w3, w2 = random_experts(g, E, dim, ffn_dim, requires_grad=True)
    _, weights, experts = route(logits, top_k)
    fast = moe_grouped_mm(x, weights, experts, w1, w3, w2, torch.float32)
    slow = moe_reference(x, weights, experts, w1, w3, w2)
    assert_same_with_gradients(fast, slow, (x, w1, w3, w2))  # so training may use the fast path


@pytest.mark.skipif(nano_orion.fast.TORCH_VERSION < (2, 13), reason="F.grouped_mm runs on the CPU from torch 2.13")
def test_grouped_mm_runs_on_this_cpu():
    """torch 2.13's CPU build has F.grouped_mm: the tests here exercise it, not only the plain blocks."""
    assert grouped_mm_dtype(torch.zeros(1, 16), 24, compiling=False) == torch.float32
    assert grouped_mm_dtype(torch.zeros(1, 16), 24, compiling=True) is None  # compiled: bf16 only
    assert (
        grouped_mm_dtype(torch.zeros(1, 12, dtype=torch.bfloat16), 24, compiling=False) is None
    )  # rows not 16-byte aligned
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_mm_dtype(torch.zeros(1, 16), 24, compiling=True) == torch.bfloat16  # autocast's dtype


def test_fast_experts_in_bfloat16_under_autocast():
    """Training's setting: float32 weights, bf16 autocast. grouped_mm gets bf16 operands
    (it is not autocast's), and gradients reach the float32 weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    experts_module = Experts(4, 16, 24)
    with torch.no_grad():
        for w, v in zip((experts_module.w1, experts_module.w3, experts_module.w2), random_experts(g, 4, 16, 24)):
            w.copy_(v)
    w1, w3, w2 = experts_module.w1, experts_module.w3, experts_module.w2
    _, weights, experts = route(torch.randn(40, 4, generator=g), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = FastExperts(experts_module)(x, weights, experts)
    slow = moe_reference(x, weights, experts, w1, w3, w2)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=0.05 * slow.abs().max().item(), rtol=0)
    fast.square().sum().backward()
    assert w1.grad.dtype == torch.float32 and w1.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="F.grouped_mm's CUDA kernels need a GPU")
def test_grouped_mm_on_the_gpu_with_blocks_of_any_size():
    """On a GPU, bf16: forward and gradients against the float32 loop, with experts getting
    token counts that are not multiples of 8 (and one getting none)."""
    g = torch.Generator().manual_seed(0)
    E, D, F_ = 8, 64, 128
    experts = torch.tensor([[0, 1]] * 3 + [[1, 2]] * 5 + [[3, 5]] * 7 + [[6, 7]] * 2)  # expert 4: no tokens
    weights = torch.rand(len(experts), 2, generator=g).softmax(-1)
    x = torch.randn(len(experts), D, generator=g)
    w = random_experts(g, E, D, F_)
    args = [t.cuda().requires_grad_() for t in (x, *w)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert grouped_mm_dtype(args[0], F_, compiling=False) == torch.bfloat16
        fast = moe_grouped_mm(args[0], weights.cuda(), experts.cuda(), *args[1:], torch.bfloat16)
    ref_args = [t.clone().requires_grad_() for t in (x, *w)]
    slow = moe_reference(ref_args[0], weights, experts, *ref_args[1:])
    scale = slow.abs().max().item()
    torch.testing.assert_close(fast.float().cpu(), slow, atol=0.03 * scale, rtol=0)
    probe = torch.randn(slow.shape, generator=g)
    for a, b in zip(
        torch.autograd.grad((fast.float().cpu() * probe).sum(), args),
        torch.autograd.grad((slow * probe).sum(), ref_args),
    ):
        torch.testing.assert_close(a.float().cpu(), b, atol=0.03 * b.abs().max().item(), rtol=0)


@settings(max_examples=30, deadline=None)
@given(routing_problems(), st.sampled_from([4, 16]), st.sampled_from([8, 20]))
def test_decoding_ways_equal_reference_loop(problem, dim, ffn_dim):
    """moe_gathered (any few tokens) and moe_one_token (one token), decoding's two ways."""
    logits, top_k, g = problem
    N, E = logits.shape
    x = torch.randn(N, dim, generator=g)
    w1, w3, w2 = random_experts(g, E, dim, ffn_dim)
    _, weights, experts = route(logits, top_k)
    slow = moe_reference(x, weights, experts, w1, w3, w2)
    torch.testing.assert_close(moe_gathered(x, weights, experts, w1, w3, w2), slow, atol=1e-4, rtol=1e-5)
    one = moe_one_token(x[:1], weights[:1], experts[:1], w1, w3, w2)
    torch.testing.assert_close(one, slow[:1], atol=1e-4, rtol=1e-5)


def called(module, *args):
    """The names of fast.py's functions that running module(*args) calls."""
    names = ("moe_gathered", "moe_one_token", "moe_grouped", "moe_grouped_mm")
    mocks = {n: mock.MagicMock(wraps=getattr(nano_orion.fast, n)) for n in names}
    with mock.patch.multiple(nano_orion.fast, **mocks):
        module(*args)
    return {n for n, m in mocks.items() if m.called}


def test_fast_experts_choose_the_way_that_suits_the_call():
    """Decoding without gradients: one token on the CPU's eager path, a few under compile
    (read in place); otherwise the grouped blocks, in one grouped_mm where it runs."""
    g = torch.Generator().manual_seed(0)
    plain = Experts(8, 16, 24)
    fast = FastExperts(plain)
    assert fast.w1 is plain.w1  # the same parameters
    _, weights, experts = route(torch.randn(12, 8, generator=g), 2)
    x = torch.randn(12, 16, generator=g)
    grouped = {"moe_grouped_mm"} if CPU_GROUPED_MM else {"moe_grouped"}
    with torch.no_grad():
        assert called(fast, x[:1], weights[:1], experts[:1]) == {"moe_one_token"}
        assert called(fast, x[:3], weights[:3], experts[:3]) == grouped
        with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
            assert called(fast, x[:3], weights[:3], experts[:3]) == {"moe_gathered"}
        assert called(fast, x, weights, experts) == grouped
    assert called(fast, x[:3], weights[:3], experts[:3]) == grouped  # gradients: never decoding's ways


def test_accelerate_swaps_the_experts_and_keeps_the_parameters():
    torch.manual_seed(0)
    model = Orion(OrionConfig.preset("toy", n_layers=2)).eval()
    names = [n for n, _ in model.named_parameters()]
    idx = torch.randint(0, 4096, (1, 12))
    with torch.no_grad():
        plain_logits = model(idx)
        plain_tokens = nano_orion.generate(model, idx, 6)
        assert accelerate(model) is model
        assert all(isinstance(block.moe.experts, FastExperts) for block in model.layers)
        assert [n for n, _ in model.named_parameters()] == names  # checkpoints and optimizers see no difference
        torch.testing.assert_close(model(idx), plain_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(nano_orion.generate(model, idx, 6), plain_tokens)
    int8 = quantize_model(model)
    assert all(isinstance(block.moe.experts, Int8Experts) for block in accelerate(int8).layers)  # int8 stays


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@torch.inference_mode()
def test_compiled_one_row_linears_read_their_weights_in_a_fused_loop(dtype):
    """Compiled on the CPU, a one-row FastLinear and an int8 Int8Linear multiply by
    gemv_fused: no matmul kernel runs, and the result is the float32 product of the weights
    they hold (rounded to x's dtype). Eager, F.linear serves."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    if dtype == "int8":
        layer, x = Int8Linear(linear), torch.randn(1, 1, 64)
        w = layer.weight.float() * layer.scale[:, None]
    else:
        layer = FastLinear(linear.to(getattr(torch, dtype)))
        x = torch.randn(1, 1, 64, dtype=layer.weight.dtype)
        w = layer.weight.float()
    expected = (x.float() @ w.T).to(x.dtype)
    with torch.profiler.profile() as prof:
        y = torch.compile(layer, fullgraph=True)(x)
    assert not [e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm", "aten::addmm")]
    torch.testing.assert_close(y, expected, rtol=1e-2 if dtype == "bfloat16" else 1e-5, atol=1e-5)
    assert not nano_orion.fast.fuses_gemv(x)


@torch.inference_mode()
def test_a_fused_one_row_product_reads_its_input_computed_once():
    """gemv_fused's loop reads x once per output row. x computed by a norm (a square root,
    products) must be written to memory once and loaded, not recomputed inside that loop for
    every row: the generated code holds no square root from the loop over the 48 output rows
    on, and without computed_once it does (which shows the check can fail)."""
    from torch._inductor.utils import run_and_get_code

    norm, w = nano_orion.model.RMSNorm(64, 1e-5), torch.randn(48, 64, dtype=torch.bfloat16)

    def row_loops_with_sqrt(computed_once):
        def product(x):
            return nano_orion.fast.gemv_fused(norm(x).to(torch.bfloat16), w)

        torch._dynamo.reset()
        with mock.patch.object(nano_orion.fast, "computed_once", computed_once):
            _, (code,) = run_and_get_code(torch.compile(product, fullgraph=True), torch.randn(1, 64))
        kernels = [k.split("''')")[0] for k in code.split("async_compile.cpp_pybinding(")[1:]]  # their C++
        return [k for k in kernels if "48L" in k and "sqrt" in k[k.index("48L") :]]

    assert not row_loops_with_sqrt(nano_orion.fast.computed_once)
    assert row_loops_with_sqrt(lambda x: x)


def test_accelerate_linears_keeps_the_weights():
    model = Orion(OrionConfig.preset("toy", n_layers=1))
    weights = dict(model.named_parameters())
    accelerate_linears(model)
    assert type(model.lm_head) is FastLinear and type(model.layers[0].attn.wq) is FastLinear
    assert dict(model.named_parameters()).keys() == weights.keys()
    assert all(p is weights[name] for name, p in model.named_parameters())
