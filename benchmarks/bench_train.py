"""Training throughput: nano_orion vs transformers' MixtralForCausalLM, measured in one run.

One training step = forward, cross-entropy + load-balancing loss, backward, gradient
clipping, AdamW step (fused, as train.py), on the same shape, the same weights (the
Mixtral copy is loaded from nano_orion's RMSNorm model) and the same batches. Steps of
the models alternate, so all see the same machine load.

On the CPU (float32): tokens/s come from each model's fastest step (the one other
processes on a shared machine disturbed least); the ratio is the median over steps of the
paired ratios in process CPU time, which time spent descheduled does not inflate (with one
torch thread, OMP_NUM_THREADS=1, it is the cleanest comparison). The output layer and its
cross-entropy are timed alone too, both ways: from the whole logits, as transformers does,
and in chunks, as nano_orion does (nano_orion/loss.py).

On a GPU (bf16 autocast, float32 weights and optimizer, as train.py): the median step's
tokens/s and MFU (6 x active parameters FLOPs per token, against the card's spec-sheet
peak), for nano_orion eager and compiled (torch.compile of the forward and the losses,
as train.py --compile) and transformers eager.

    make bench-train-gpu PY=python3        # the 583 M MoE, 16 x 1024 tokens, on the GPU
    python -m benchmarks.bench_train       # toy shape, 16 x 128 tokens, CPU
    python -m benchmarks.bench_train --device cuda --config orion-583m --batch-size 16 --block-size 1024
"""

import copy
import platform
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import train
from benchmarks.bench_generate import best_times
from nano_orion import Orion, OrionConfig
from nano_orion.cli import ArgumentParser, HelpFormatter
from nano_orion.fast import accelerate
from nano_orion.hf_mixtral import to_mixtral
from nano_orion.loss import cross_entropy

CONFIGS = {
    "toy": OrionConfig.preset("toy"),
    # An Orion-shaped MoE of 583 M parameters (164 M active per token), sized for one GPU.
    "orion-583m": OrionConfig(
        vocab_size=4096,
        dim=1024,
        n_layers=8,
        n_heads=16,
        n_kv_heads=4,
        ffn_dim=2816,
        n_experts=8,
        top_k=2,
        max_seq_len=2048,
    ),
}


def transformers_twin(nano: Orion, bf16_autocast: bool):
    """transformers' MixtralForCausalLM on nano's weights, for training, with its default
    attention (sdpa). Under bf16 autocast, its eager experts: its default ones (grouped_mm,
    which autocast does not cover) cast their input to the weights' float32 and would train
    in float32, while every other matmul, nano_orion's experts included, runs in bf16."""
    hf = to_mixtral(nano, attn_implementation="sdpa").train()
    if bf16_autocast:
        hf.set_experts_implementation("eager")
    return hf


def main(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    p.add_argument("--config", default="toy", choices=sorted(CONFIGS), help="model shape")
    p.add_argument("--device", default="cpu", help="cpu, in float32, or cuda, under bf16 autocast")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=16, help="timed steps of each model (after 2 warm-up steps)")
    p.add_argument("--no-compile", action="store_true", help="on a GPU, leave out the compiled nano_orion")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    config = replace(CONFIGS[args.config], norm_type="rmsnorm")  # Mixtral's norm
    nano = accelerate(Orion(config).to(device))
    hf = transformers_twin(nano, bf16_autocast=on_gpu)
    nano = train.NextTokenLoss(nano)  # as train.py runs it
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1), generator=g).to(device)
        for _ in range(args.steps + 2)
    ]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu)

    def nano_loss(model, batch):
        ce, aux, _ = train.losses(model, model.model, batch[:, :-1], batch[:, 1:])
        return ce + config.router_aux_loss_coef * aux

    def hf_loss(model, batch):
        out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        return ce + config.router_aux_loss_coef * out.aux_loss

    # The same loss on the same weights.
    with torch.no_grad(), autocast:
        a, b = nano_loss(nano, batches[0]).item(), hf_loss(hf, batches[0]).item()
    print(f"first-batch loss: nano_orion {a:.4f}, transformers {b:.4f}")

    runs = {"nano_orion": (nano, nano_loss), "transformers": (hf, hf_loss)}
    if on_gpu and not args.no_compile:
        twin = copy.deepcopy(nano)  # its own weights, stepped by its own optimizer
        runs["nano_orion compiled"] = (twin, torch.compile(nano_loss))
    steps = {name: make_step(model, loss, autocast) for name, (model, loss) in runs.items()}
    times = {name: [] for name in runs}
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        for name, step in steps.items():  # alternate: all see the same machine load
            dt = step(batch)
            if i >= 2:
                times[name].append(dt)
        if i == 0 and "nano_orion compiled" in runs:
            print(f"first steps, compiling included: {time.perf_counter() - t0:.0f} s")

    tokens = args.batch_size * args.block_size
    precision = "bf16 autocast (transformers: eager experts, see transformers_twin)" if on_gpu else "float32"
    print(
        f"config {args.config} ({config.n_params() / 1e6:.1f} M parameters, {config.n_active_params() / 1e6:.1f} M "
        "active), "
        f"batch {args.batch_size} x {args.block_size} tokens, {precision}, {args.steps} timed steps each"
    )
    if on_gpu:
        report_gpu(times, tokens, config, device)
    else:
        report_cpu(times, tokens, config)


def make_step(model, loss_fn, autocast):
    """-> step(batch): one training step of `model` (with an optimizer of its own) on a batch,
    returning (wall seconds, process CPU seconds)."""
    opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=True)  # as train.py
    on_gpu = next(model.parameters()).is_cuda

    def step(batch):
        if on_gpu:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def report_gpu(times: dict, tokens: int, config: OrionConfig, device) -> None:
    name = torch.cuda.get_device_name(device)
    peak = train.spec_peak_flops(name)
    print(
        f"device: {name}, torch {torch.__version__}; MFU against {peak / 1e12:.0f} TFLOP/s (dense bf16 spec)"
        if peak
        else f"device: {name}, torch {torch.__version__}; no spec-sheet peak known, so no MFU"
    )
    tok_s = {n: tokens / statistics.median(wall for wall, _ in t) for n, t in times.items()}
    for n, v in tok_s.items():
        mfu = f", MFU {v * 6 * config.n_active_params() / peak:.1%}" if peak else ""
        print(f"  {n:20s} {v:12,.0f} tokens/s (median step){mfu}; {tok_s[n] / tok_s['transformers']:.2f}x transformers")


def report_cpu(times: dict, tokens: int, config: OrionConfig) -> None:
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}"
    )
    tok_s = {n: tokens / min(wall for wall, _ in t) for n, t in times.items()}
    for n, v in tok_s.items():
        print(f"  {n:13s} {v:10,.0f} tokens/s per training step (fwd + bwd + AdamW), fastest step")
    # Step i of both models ran back to back: their CPU-time ratio is little affected by load changes.
    paired = statistics.median(h[1] / n[1] for n, h in zip(times["nano_orion"], times["transformers"]))
    plain, chunked = output_layer_ms(config, tokens)
    print(
        f"  of which the output layer + cross-entropy (fwd + bwd): {plain:.0f} ms from the whole logits "
        "(transformers), "
        f"{chunked:.0f} ms in chunks (nano_orion); nano_orion's fastest step: "
        f"{1e3 * tokens / tok_s['nano_orion']:.0f} ms"
    )
    print(
        f"nano_orion / transformers: {paired:.2f}x (median over paired steps, CPU time); "
        f"{tok_s['nano_orion'] / tok_s['transformers']:.2f}x (fastest steps, wall-clock)"
    )


def output_layer_ms(config, n_tokens: int) -> tuple[float, float]:
    """Fastest of 6 forward + backward passes of lm_head and the cross-entropy alone (wall-clock):
    F.cross_entropy of the whole logits, and nano_orion's chunks."""
    h = torch.randn(n_tokens, config.dim, requires_grad=True)
    w = torch.randn(config.vocab_size, config.dim, requires_grad=True)
    y = torch.randint(0, config.vocab_size, (n_tokens,))
    best = best_times(
        {
            "plain": lambda: F.cross_entropy(F.linear(h, w), y).backward(),
            "chunked": lambda: cross_entropy(h, w, y).backward(),
        },
        repeats=6,
    )
    return 1e3 * best["plain"], 1e3 * best["chunked"]


if __name__ == "__main__":
    main()
