"""roofline.png: one H100's roofline, with Orion-MoE8x7B's decode and prefill placed on it."""

from pathlib import Path

import torch

import nano_orion

from .style import pyplot

# The roofline of one H100 SXM, from NVIDIA's spec sheet: dense bf16 tensor-core arithmetic
# (without sparsity) and HBM3 bandwidth. Inputs, not measurements.
H100_SPEC_FLOPS = 989e12
H100_SPEC_BYTES_PER_S = 3.35e12
# Measured, for comparison: a cuBLAS bf16 GEMV of one Orion expert (14592 x 4096) on one
# NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, November 2026 (benchmarks/bench_gpu.gemv_bandwidth).
H100_MEASURED_GEMV_BYTES_PER_S = 2.62e12


def expected_experts(batch: int, n_experts: int = 8, top_k: int = 2) -> float:
    """Distinct experts a layer reads for `batch` tokens, each choosing top_k of n_experts
    uniformly: n_experts * (1 - (1 - top_k / n_experts) ** batch)."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def roofline_points() -> list[tuple[str, float]]:
    """(label, FLOPs per byte of weights read) of Orion-MoE8x7B's decode and prefill.

    FLOPs: 2 per active parameter per token (attention's own arithmetic over the context is
    left out). Bytes: the weights a step reads (bench_gpu.bytes_per_token, counted on the meta
    device, int8 scales included): batch-1 decode reads top_k experts per layer, a batch of B
    tokens the experts they choose between them (expected_experts), a long prompt all of them.
    """
    from benchmarks.bench_gpu import bytes_per_token
    from nano_orion.quantize import quantize_model

    config = nano_orion.OrionConfig.preset("orion-moe-8x7b", norm_type="rmsnorm")
    with torch.device("meta"):
        bf16 = nano_orion.Orion(config).to(torch.bfloat16)
        int8 = quantize_model(nano_orion.Orion(config).to(torch.bfloat16))
    flops = 2 * config.n_active_params()  # per token
    one_expert = sum(p.numel() * p.element_size() for n, p in bf16.named_parameters() if n.endswith(("w1", "w2", "w3")))
    one_expert //= config.n_experts  # bytes of one expert in every layer
    shared = bytes_per_token(bf16) - config.top_k * one_expert  # attention, routers, norms, lm_head

    def step_bytes(batch):
        return shared + expected_experts(batch, config.n_experts, config.top_k) * one_expert

    return [
        ("decode, batch 1, bf16", flops / bytes_per_token(bf16)),
        ("decode, batch 1, int8", flops / bytes_per_token(int8)),
        ("decode, batch 64, bf16", 64 * flops / step_bytes(64)),
        ("prefill, 4096 tokens, bf16", 4096 * flops / (shared + config.n_experts * one_expert)),
    ]


def plot_roofline(out: Path):
    """Attainable FLOP/s = min(peak, bandwidth x FLOPs per byte), log-log, for one H100 SXM
    (spec sheet), with Orion-MoE8x7B's workloads placed at their FLOPs per byte."""
    plt = pyplot()
    peak, bandwidth, measured = (
        H100_SPEC_FLOPS / 1e12,
        H100_SPEC_BYTES_PER_S / 1e12,
        H100_MEASURED_GEMV_BYTES_PER_S / 1e12,
    )
    flops_per_token = 2 * nano_orion.OrionConfig.preset("orion-moe-8x7b").n_active_params() / 1e12  # TFLOP
    ridge = peak / bandwidth  # FLOPs per byte where the two limits meet
    fig, ax = plt.subplots(figsize=(9.5, 6), layout="constrained")
    x = [0.25, ridge, 2e4]
    ax.loglog(
        x,
        [min(peak, bandwidth * i) for i in x],
        color="black",
        lw=2,
        label=f"H100 SXM, spec sheet: {bandwidth} TB/s, {peak:.0f} TFLOP/s dense bf16",
    )
    ax.loglog(
        [0.25, 60],
        [measured * 0.25, measured * 60],
        color="gray",
        lw=1,
        ls="--",
        label=f"{measured} TB/s: a bf16 GEMV measured on one H100 80GB HBM3 (November 2026)",
    )
    ax.axvspan(0.25, ridge, color="#dae8fc", alpha=0.45, lw=0)
    ax.text(0.3, 1800, "memory-bound: time = bytes / bandwidth", fontsize=9, va="center")
    ax.text(ridge * 1.15, 1800, "compute-bound:\ntime = FLOPs / peak", fontsize=9, va="center")
    ax.axvline(ridge, color="gray", lw=0.8, ls=":")
    ax.text(
        ridge * 0.9,
        5,
        f"ridge: {ridge:.0f} FLOPs per byte",
        fontsize=8,
        rotation=90,
        va="bottom",
        ha="right",
        color="#444444",
    )
    markers = {
        "decode, batch 1, bf16": ("o", "C0", ""),
        "decode, batch 1, int8": ("s", "C2", ""),
        "decode, batch 64, bf16": ("^", "C1", " (all 64 streams)"),
        "prefill, 4096 tokens, bf16": ("D", "C3", " of prompt"),
    }
    for label, intensity in roofline_points():
        attainable = min(peak, bandwidth * intensity)
        marker, color, which = markers[label]
        ax.loglog(
            [intensity],
            [attainable],
            marker,
            color=color,
            ms=9,
            mec="black",
            label=f"{label}: {intensity:.{1 if intensity < 100 else 0}f} FLOPs/byte; at most {attainable:.3g} TFLOP/s "
            f"({attainable / peak:.1%} of peak) = {attainable / flops_per_token:,.0f} tokens/s{which}",
        )
    ax.set(
        xlim=(0.25, 2e4),
        ylim=(0.3, 4000),
        xlabel="arithmetic intensity: FLOPs per byte read from memory",
        ylabel="attainable TFLOP/s (an upper bound)",
    )
    ax.set_title(
        "The roofline of one H100 SXM, and where Orion-MoE8x7B's work sits on it\n"
        "(2 FLOPs per active weight and token; bytes: the weights a step reads)",
        fontsize=10,
    )
    ax.grid(True, which="major", color="#dddddd", lw=0.6)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.95)
    fig.savefig(out)
    plt.close(fig)
