"""Training throughput: nano_orion vs transformers' MixtralForCausalLM, measured in one run.

One training step = forward, cross-entropy + load-balancing loss, backward, gradient
clipping, AdamW step: tokens per second of each, on the same shape, the same weights (the
Mixtral copy is loaded from nano_orion's RMSNorm model) and the same batches. Steps of
the two alternate, so both see the same machine load. Tokens/s come from each model's
fastest step (the one other processes on a shared machine disturbed least); the ratio is
the median over steps of the paired ratios in process CPU time, which time spent
descheduled does not inflate (with one torch thread, OMP_NUM_THREADS=1, it is the
cleanest comparison). The output layer and its cross-entropy, the same work in both, are
timed alone too: they bound how far any model code can pull ahead.

    python -m benchmarks.bench_train                       # toy shape, 16 x 128 tokens
    python -m benchmarks.bench_train --batch-size 8 --block-size 256 --steps 10
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import train
from nano_orion import Orion, OrionConfig
from nano_orion.config import PRESETS
from nano_orion.hf_mixtral import to_mixtral


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="toy", choices=sorted(PRESETS), help="model shape preset")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=16, help="timed steps of each model (after 2 warm-up steps)")
    args = p.parse_args()

    torch.manual_seed(0)
    config = OrionConfig.preset(args.config, norm_type="rmsnorm")  # Mixtral's norm
    nano = Orion(config)
    hf = to_mixtral(nano, attn_implementation="sdpa").train()  # transformers' default attention
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1), generator=g)
               for _ in range(args.steps + 2)]

    def nano_step(batch):
        x, y = batch[:, :-1], batch[:, 1:]
        ce, aux, _ = train.losses(nano, nano, x, y)
        return ce + config.router_aux_loss_coef * aux

    def hf_step(batch):
        x, y = batch[:, :-1], batch[:, 1:]
        out = hf(input_ids=x, output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        return ce + config.router_aux_loss_coef * out.aux_loss

    # The same loss on the same weights: both do the same work.
    with torch.no_grad():
        a, b = nano_step(batches[0]).item(), hf_step(batches[0]).item()
    print(f"first-batch loss: nano_orion {a:.5f}, transformers {b:.5f}")

    runs = {}
    for name, model, step in (("nano_orion", nano, nano_step), ("transformers", hf, hf_step)):
        opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=True)  # as train.py

        def one(batch, model=model, step=step, opt=opt):
            t0, c0 = time.perf_counter(), time.process_time()
            step(batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0, time.process_time() - c0

        runs[name] = (one, [])
    for i, batch in enumerate(batches):
        for one, times in runs.values():  # alternate: both see the same machine load
            dt = one(batch)
            if i >= 2:
                times.append(dt)

    tokens = args.batch_size * args.block_size
    tok_s = {name: tokens / min(wall for wall, _ in times) for name, (_, times) in runs.items()}
    # Step i of both models ran back to back: their CPU-time ratio is little affected by load changes.
    paired = statistics.median(h[1] / n[1] for n, h in zip(runs["nano_orion"][1], runs["transformers"][1]))
    print(f"config {args.config} ({config.n_params() / 1e6:.2f} M parameters, {config.n_active_params() / 1e6:.2f} M active), "
          f"batch {args.batch_size} x {args.block_size} tokens, float32, {args.steps} timed steps each")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    for name, v in tok_s.items():
        print(f"  {name:13s} {v:10,.0f} tokens/s per training step (fwd + bwd + AdamW), fastest step")
    print(f"  of which the same work in both, output layer + cross-entropy (fwd + bwd): "
          f"{shared_output_ms(config, args.batch_size * args.block_size):.0f} ms per step; "
          f"nano_orion's fastest step: {1e3 * tokens / tok_s['nano_orion']:.0f} ms")
    print(f"nano_orion / transformers: {paired:.2f}x (median over paired steps, CPU time); "
          f"{tok_s['nano_orion'] / tok_s['transformers']:.2f}x (fastest steps, wall-clock)")


def shared_output_ms(config, n_tokens: int) -> float:
    """Fastest of 6 forward + backward passes of lm_head and the cross-entropy alone (wall-clock)."""
    h = torch.randn(n_tokens, config.dim, requires_grad=True)
    w = torch.randn(config.vocab_size, config.dim, requires_grad=True)
    y = torch.randint(0, config.vocab_size, (n_tokens,))
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        F.cross_entropy(F.linear(h, w), y).backward()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best

if __name__ == "__main__":
    main()
