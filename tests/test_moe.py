"""Routing and expert dispatch."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_orion import OrionConfig
import nano_orion.moe
from nano_orion.moe import (MoE, expert_counts, load_balancing_loss, moe_gathered, moe_grouped, moe_one_token,
                            moe_reference, route)


@st.composite
def routing_problems(draw):
    n_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, n_experts))
    N = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, n_experts, generator=g) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    return logits, top_k, g


@settings(max_examples=60, deadline=None)
@given(routing_problems())
def test_route_weights_are_a_distribution_over_top_k_distinct_experts(problem):
    logits, top_k, _ = problem
    probs, weights, experts = route(logits, top_k)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(logits)))
    for row in experts.tolist():
        assert len(set(row)) == top_k
    # The chosen experts are the top_k of the router probabilities: none left out is larger.
    chosen = probs.gather(1, experts)
    left_out = probs.scatter(1, experts, float("-inf"))
    assert (chosen.min(-1).values >= left_out.max(-1).values).all()


@settings(max_examples=60, deadline=None)
@given(routing_problems())
def test_renormalised_top_k_equals_softmax_over_chosen_logits(problem):
    logits, top_k, _ = problem
    _, weights, experts = route(logits, top_k)
    torch.testing.assert_close(weights, F.softmax(logits.gather(1, experts), dim=-1))


def random_experts(g, E, dim, ffn_dim, requires_grad=False):
    w1, w3 = (torch.randn(E, ffn_dim, dim, generator=g, requires_grad=requires_grad) for _ in range(2))
    w2 = torch.randn(E, dim, ffn_dim, generator=g, requires_grad=requires_grad)
    return w1, w3, w2


# Whether this torch runs F.grouped_mm on the CPU (from 2.13, which make test installs; a GPU
# machine's python may be older).
CPU_GROUPED_MM = nano_orion.moe.grouped_mm_runs(torch.device("cpu"), torch.float32, 16, 24, compiling=False)


@settings(max_examples=40, deadline=None)
@given(routing_problems(), st.sampled_from([4, 16]), st.sampled_from([8, 20]), st.sampled_from([False, True] if CPU_GROUPED_MM else [False]))
def test_grouped_dispatch_equals_reference_loop(problem, dim, ffn_dim, grouped_mm):
    """Both ways moe_grouped runs: one F.grouped_mm per projection, and the per-expert loop
    it falls back to where grouped_mm is unavailable (forced here)."""
    logits, top_k, g = problem
    N, E = logits.shape
    x = torch.randn(N, dim, generator=g, requires_grad=True)
    w1, w3, w2 = random_experts(g, E, dim, ffn_dim, requires_grad=True)
    _, weights, experts = route(logits, top_k)
    with mock.patch.object(nano_orion.moe, "grouped_mm_runs", lambda *args: grouped_mm):
        fast = moe_grouped(x, weights, experts, w1, w3, w2)
    slow = moe_reference(x, weights, experts, w1, w3, w2)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-5)
    # Gradients agree too, so training may use the fast path.
    grads_fast = torch.autograd.grad(fast.square().sum(), (x, w1, w3, w2))
    grads_slow = torch.autograd.grad(slow.square().sum(), (x, w1, w3, w2))
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13), reason="F.grouped_mm runs on the CPU from torch 2.13")
def test_grouped_mm_runs_on_this_cpu():
    """torch 2.13's CPU build has F.grouped_mm: the tests above exercise it, not only the fallback."""
    cpu = torch.device("cpu")
    assert nano_orion.moe.grouped_mm_runs(cpu, torch.float32, 16, 24, compiling=False)
    assert not nano_orion.moe.grouped_mm_runs(cpu, torch.float32, 16, 24, compiling=True)  # compiled: bf16 only
    assert not nano_orion.moe.grouped_mm_runs(cpu, torch.bfloat16, 12, 24, compiling=False)  # rows not 16-byte aligned


def test_grouped_dispatch_in_bfloat16_under_autocast():
    """Training's setting: float32 weights, bf16 autocast. grouped_mm gets bf16 operands
    (it is not autocast's), and gradients reach the float32 weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    w1, w3, w2 = random_experts(g, 4, 16, 24, requires_grad=True)
    _, weights, experts = route(torch.randn(40, 4, generator=g), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = moe_grouped(x, weights, experts, w1, w3, w2)
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
        fast = moe_grouped(args[0], weights.cuda(), experts.cuda(), *args[1:])
    ref_args = [t.clone().requires_grad_() for t in (x, *w)]
    slow = moe_reference(ref_args[0], weights, experts, *ref_args[1:])
    scale = slow.abs().max().item()
    torch.testing.assert_close(fast.float().cpu(), slow, atol=0.03 * scale, rtol=0)
    probe = torch.randn(slow.shape, generator=g)
    for a, b in zip(torch.autograd.grad((fast.float().cpu() * probe).sum(), args), torch.autograd.grad((slow * probe).sum(), ref_args)):
        torch.testing.assert_close(a.float().cpu(), b, atol=0.03 * b.abs().max().item(), rtol=0)


@settings(max_examples=30, deadline=None)
@given(routing_problems(), st.sampled_from([4, 16]), st.sampled_from([8, 20]))
def test_decoding_dispatch_equals_reference_loop(problem, dim, ffn_dim):
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


def test_expert_counts_equal_bincount():
    experts = torch.randint(0, 6, (50, 2), generator=torch.Generator().manual_seed(0))
    counts = expert_counts(experts, 8)
    assert counts.dtype == torch.int32
    assert counts.tolist() == experts.flatten().bincount(minlength=8).tolist()


def test_reference_loop_matches_a_per_token_formula():
    """The reference itself, against the formula y = sum_j w_j expert_{e_j}(x) token by token."""
    g = torch.Generator().manual_seed(0)
    E, D, F_, N, k = 4, 6, 10, 7, 2
    x = torch.randn(N, D, generator=g)
    w1, w3 = torch.randn(E, F_, D, generator=g), torch.randn(E, F_, D, generator=g)
    w2 = torch.randn(E, D, F_, generator=g)
    _, weights, experts = route(torch.randn(N, E, generator=g), k)
    y = moe_reference(x, weights, experts, w1, w3, w2)
    for n in range(N):
        expected = sum(
            weights[n, j] * (w2[e] @ (F.silu(w1[e] @ x[n]) * (w3[e] @ x[n])))
            for j, e in enumerate(experts[n].tolist())
        )
        torch.testing.assert_close(y[n], expected, atol=1e-4, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 30))
def test_permuting_tokens_permutes_outputs(seed, N):
    torch.manual_seed(seed)
    moe = MoE(OrionConfig(dim=16, ffn_dim=24, n_experts=5, top_k=2, n_heads=2, n_kv_heads=1, vocab_size=10))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, N, 16)
    perm = torch.randperm(N)
    with torch.no_grad():
        y, y_perm = moe(x), moe(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], atol=1e-4, rtol=1e-4)


def test_load_balancing_loss_is_top_k_when_balanced_and_grows_when_collapsed():
    E, k, N = 8, 2, 64
    # Perfect balance: uniform probabilities, every expert chosen by N * k / E tokens.
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.stack([torch.arange(k) + 2 * (n % (E // k)) for n in range(N)])
    assert torch.isclose(load_balancing_loss(uniform, balanced), torch.tensor(float(k)))
    # Collapse: every token sends everything to experts 0 and 1.
    collapsed_probs = torch.zeros(N, E)
    collapsed_probs[:, :2] = 0.5
    collapsed = torch.tensor([[0, 1]] * N)
    loss = load_balancing_loss(collapsed_probs, collapsed)
    assert loss > k
    assert torch.isclose(loss, torch.tensor(E * (1.0 * 0.5 + 1.0 * 0.5)))  # E * sum f_e P_e by hand
    # Partial concentration lies in between.
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(0)) + torch.tensor([3.0] + [0.0] * (E - 1))
    probs, _, experts = route(logits, k)
    assert k < load_balancing_loss(probs, experts) < loss


def test_load_balancing_loss_reaches_the_router():
    torch.manual_seed(0)
    moe = MoE(OrionConfig(dim=8, ffn_dim=8, n_experts=4, top_k=2, n_heads=2, n_kv_heads=1, vocab_size=10))
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    moe(torch.randn(1, 12, 8))
    probs, experts = moe.routing
    load_balancing_loss(probs, experts).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
