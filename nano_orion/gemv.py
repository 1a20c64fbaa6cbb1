"""Decoding's matrix-vector products, reading only the weights they need, where they lie.

Generating one token multiplies a handful of vectors by big weight matrices: the work is
tiny, and the time is the time it takes to read the weights from memory. So the two
things that matter are to read each needed byte once, and no byte that is not needed.

`expert_gemv` computes, for each row r of x,

    y[r] = W[expert[r]] @ x[r]        (times scale[expert[r]], per output row, for int8 W)

with W (n_experts, out, in) the stacked weights of every expert (or one matrix, n_experts
= 1). In an MoE decoding step the rows are a token's (token, slot) pairs and `expert`
their chosen experts, so only top_k of the n_experts matrices are read. For int8 weights
(quantize.py) the conversion to floats happens on the fly, as each weight is read, and
the per-row scale multiplies the outputs, not the weights.

Two implementations compute the same thing:
  * `expert_gemv_reference`, plain PyTorch: index the stacked weights, multiply. Run as
    is, the indexing copies the chosen experts' weights (torch.compile can fuse it away);
  * a Triton kernel, used on CUDA: each program multiplies a block of output rows of one
    (row, expert) pair, loading int8 or bf16 weights and accumulating in float32. The
    expert ids are read on the GPU, so a compiled decoding step never waits for the host.
Triton's interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors; the tests
compare it with the reference that way.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the reference serves
    triton = None


def expert_gemv_reference(x, w, expert, scale=None):
    """x (R, in); w (n_experts, out, in); expert (R,) int; scale (n_experts, out) or None -> (R, out)."""
    y = torch.einsum("ri,roi->ro", x, w[expert].to(x.dtype))
    return y if scale is None else y * scale[expert].to(x.dtype)


def expert_gemv(x, w, expert, scale=None):
    """expert_gemv_reference's result; on CUDA computed by the Triton kernel."""
    if use_triton(x):
        return torch.ops.nano_orion.expert_gemv(x, w, expert, scale)
    return expert_gemv_reference(x, w, expert, scale)


def use_triton(x) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _expert_gemv_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        expert_ptr,
        y_ptr,
        n_out,
        n_in: tl.constexpr,
        stride_x,
        stride_we,
        stride_wo,
        stride_se,
        stride_y,
        HAS_SCALE: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        # n_in is a compile-time constant: the loop below has a known trip count (one kernel per
        # matrix width, of which a model has two), and Triton's interpreter needs a plain int there
        r = tl.program_id(0)  # which row of x
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # which output rows of its expert
        e = tl.load(expert_ptr + r).to(tl.int64)
        w_rows = w_ptr + e * stride_we + o[:, None].to(tl.int64) * stride_wo  # (BLOCK_O, 1) row starts
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)  # partial products, summed across once at the end
        for start in range(0, n_in, BLOCK_I):
            i = start + tl.arange(0, BLOCK_I)
            xi = tl.load(x_ptr + r * stride_x + i, mask=i < n_in, other=0.0).to(tl.float32)
            wi = tl.load(w_rows + i[None, :], mask=(o[:, None] < n_out) & (i[None, :] < n_in), other=0).to(tl.float32)
            acc += wi * xi[None, :]
        y = tl.sum(acc, axis=1)  # (BLOCK_O,)
        if HAS_SCALE:
            y *= tl.load(scale_ptr + e * stride_se + o, mask=o < n_out, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * stride_y + o, y.to(y_ptr.dtype.element_ty), mask=o < n_out)

    # Block sizes: on a GPU the fastest of a few, timed on first use per matrix shape; the
    # interpreter cannot time anything, so there one small configuration is used.
    if os.environ.get("TRITON_INTERPRET") == "1":
        _expert_gemv_kernel = triton.heuristics({"BLOCK_O": lambda _: 16, "BLOCK_I": lambda _: 32})(_expert_gemv_kernel)
    else:
        _expert_gemv_kernel = triton.autotune(
            configs=[
                triton.Config({"BLOCK_O": o, "BLOCK_I": i}, num_warps=warps)
                for o, i, warps in [(8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 512, 8), (64, 256, 8)]
            ],
            key=["n_out", "n_in"],
        )(_expert_gemv_kernel)

    @torch.library.custom_op("nano_orion::expert_gemv", mutates_args=())
    def _expert_gemv_triton(
        x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor, scale: torch.Tensor | None
    ) -> torch.Tensor:
        R, (_, n_out, n_in) = x.shape[0], w.shape
        x, w = x.contiguous(), w.contiguous()  # the kernel walks the last dimension with stride 1
        y = torch.empty(R, n_out, dtype=x.dtype, device=x.device)
        grid = lambda meta: (R, triton.cdiv(n_out, meta["BLOCK_O"]))  # noqa: E731
        _expert_gemv_kernel[grid](
            x,
            w,
            scale if scale is not None else w,
            expert,
            y,
            n_out,
            n_in,
            x.stride(0),
            w.stride(0),
            w.stride(1),
            scale.stride(0) if scale is not None else 0,
            y.stride(0),
            HAS_SCALE=scale is not None,
        )
        return y

    @_expert_gemv_triton.register_fake
    def _(x, w, expert, scale):
        return x.new_empty(x.shape[0], w.shape[1])
