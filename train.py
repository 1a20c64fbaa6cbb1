"""Train an Orion-MoE from scratch, with the recipe of Orion's model card.

    python train.py                                  # toy model on the Python standard library, CPU ok
    python train.py --data my_texts/ --max-iters 2000
    torchrun --nproc_per_node 4 train.py --config toy --batch-size 32     # DDP, one process per GPU
    python train.py --resume --out-dir out/demo      # continue the run in out/demo (make demo's) where it stopped

The recipe (optimizer, learning-rate schedule, losses, precision), the data preparation, the
format of OUT_DIR/log.jsonl, and how checkpoints are saved atomically and resumed are described
once, in docs/08_training.md ("The real thing: train.py"); `python train.py --help` lists every
flag with its default.

OUT_DIR belongs to one run: a live run holds it (a lock the system releases when the process
ends, however it ends), and a new run refuses a folder holding another run's checkpoint or log
unless told to --resume it or to --overwrite it. --resume takes the run's saved settings. Ctrl-C
saves the step reached and stops; a full disk, bad values and unreadable files end in one line.
"""

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import nano_orion
from nano_orion import Orion, OrionConfig, SamplingConfig, Tokenizer
from nano_orion.atomic import HOST
from nano_orion.checkpoint import MAX_SHARD_BYTES, CheckpointError, first_line, is_checkpoint_file, read_nano
from nano_orion.cli import THREADS_HELP, ArgumentParser, HelpFormatter, UsageError, default_threads
from nano_orion.config import PRESETS
from nano_orion.data import DataError, check_fills_block, get_batch, prepare, read_tokens
from nano_orion.device import resolve_device
from nano_orion.fast import accelerate
from nano_orion.moe import expert_counts, load_balancing_loss

# Dense bf16 peak of known GPUs (spec sheets, without sparsity), for the MFU estimate. A key
# must be a whole word of torch.cuda.get_device_name(): "L4" is not "L40S", "A10" not "A10G".
GPU_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}

# The flags of a run: --resume takes them from the checkpoint. Of these, a resumed run may
# change the ones in CHANGEABLE (how long it runs, how often it logs and evaluates, where the
# prepared data is cached, the peak its MFU is relative to); the others would change its data,
# model or schedule mid-way. The remaining flags say how this process runs (device, threads,
# ...): the command line's.
RUN_FLAGS = (
    "config",
    "data",
    "data_dir",
    "vocab_size",
    "batch_size",
    "block_size",
    "grad_accum",
    "lr",
    "warmup_iters",
    "lr_decay_iters",
    "weight_decay",
    "seed",
    "max_iters",
    "eval_interval",
    "eval_iters",
    "log_interval",
    "peak_tflops",
)
CHANGEABLE = ("data_dir", "max_iters", "eval_interval", "eval_iters", "log_interval", "peak_tflops")
LOCK = ".lock"  # in OUT_DIR: held by the run writing it (`holding`)


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--config",
        default="toy",
        help=f"model shape: a preset ({', '.join(sorted(PRESETS))}) or a JSON file of OrionConfig fields; "
        "vocab_size is replaced by the tokenizer's (see --vocab-size)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="UTF-8 text file or folder of them (default: the Python standard library's sources)",
    )
    p.add_argument("--data-dir", default="data", help="where prepared tokenizers and uint32 token files are cached")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="tokenizer pieces to train (capped for small corpora); the model's vocab_size is the "
        "tokenizer's piece count rounded up to a multiple of 64",
    )
    p.add_argument(
        "--out-dir",
        default="out",
        help="checkpoint folder, also holding log.jsonl; a new run refuses "
        "one that holds another run's checkpoint or log (see --resume, --overwrite)",
    )
    p.add_argument("--max-iters", type=int, default=500, help="optimizer steps to train for")
    p.add_argument(
        "--lr-decay-iters",
        type=int,
        default=None,
        help="step at which the cosine reaches 10%% of --lr (default: --max-iters); set it beyond "
        "--max-iters to stop early and extend the run later with --resume",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per process")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence, at most the model's max_seq_len")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup-iters", type=int, default=50, help="steps of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the 2-D and 3-D weights")
    p.add_argument(
        "--eval-interval",
        type=int,
        default=100,
        help="steps between validation, a text sample and a checkpoint, which also end the run",
    )
    p.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    p.add_argument("--log-interval", type=int, default=10, help="steps between log.jsonl lines")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir from its checkpoint, with its saved settings; of the flags "
        "that define a run, only --max-iters, --eval-interval, --eval-iters, --log-interval, "
        "--data-dir and --peak-tflops may be changed",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in --out-dir, deleting the checkpoint and log.jsonl of the run there",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda (the first GPU; under torchrun, each process's LOCAL_RANK GPU), cuda:N, or auto: "
        "cuda if a GPU is visible, else cpu",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="autocast dtype (weights and optimizer stay float32); auto: bfloat16 on GPUs that support it",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data order")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the forward pass and the losses (the backward follows); slow first steps",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun, shard weights, gradients and optimizer "
        "state across processes with FSDP2 (fully_shard) instead of replicating them with DDP",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s, for MFU (default: the spec sheet's dense bf16 peak for known "
        "GPUs; elsewhere no MFU is shown without it)",
    )
    p.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    unset = object()  # which flags the command line gives: argparse fills in only the attributes a namespace lacks
    given = {
        name
        for name, value in vars(
            p.parse_args(argv, argparse.Namespace(**{name: unset for name in vars(p.parse_args([]))}))
        ).items()
        if value is not unset
    }
    args = p.parse_args(argv)
    for name in (
        "max_iters",
        "batch_size",
        "block_size",
        "grad_accum",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "threads",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        p.error(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out-dir and --overwrite deletes it; choose one")
    if args.config not in PRESETS and not Path(args.config).is_file():
        p.error(f"--config {args.config}: neither a preset ({', '.join(sorted(PRESETS))}) nor a JSON file")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.fsdp and world == 1:
        p.error(
            "--fsdp shards across processes, and this is one; start it with torchrun --nproc_per_node N, "
            "or leave out --fsdp"
        )
    if args.warmup_iters < 0:
        p.error(f"--warmup-iters must be at least 0, got {args.warmup_iters}")
    if args.lr_decay_iters is not None and args.lr_decay_iters < args.warmup_iters:
        p.error(
            f"--lr-decay-iters {args.lr_decay_iters} is below --warmup-iters {args.warmup_iters}: the cosine would "
            "end before the warm-up does; give it at least the warm-up's length (default: --max-iters)"
        )
    try:  # "cpu" or "cuda:N" from here on: with several processes, N is the process's LOCAL_RANK
        args.device = str(resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else None))
    except ValueError as e:
        p.error(f"--device {e}")
    return p, args, given


# ---- the recipe ------------------------------------------------------------------------


def lr_at(step: int, lr: float, warmup_iters: int, decay_iters: int, min_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr` over the
    first warmup_iters steps, then cosine from `lr` down to min_ratio x lr, reached by the
    last step, decay_iters - 1, and kept after it."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters - 1:
        return min_ratio * lr
    progress = (step - warmup_iters) / (decay_iters - 1 - warmup_iters)  # 0 -> 1
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and the 3-D stacked experts), none on norm weights and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class NextTokenLoss(nn.Module):
    """model.loss(x, y) as a forward pass: DDP synchronises the gradients of what its module's forward computes."""

    def __init__(self, model: Orion):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)  # the logits are never whole: nano_orion/loss.py


def losses(model, raw_model, x, y):
    """Cross-entropy of next-token prediction, the load-balancing loss averaged over layers,
    and each layer's routed-slot count per expert (n_layers, n_experts). model computes the
    cross-entropy (NextTokenLoss(raw_model), or DDP of it); raw_model's layers keep their routing."""
    ce = model(x, y)
    routers = raw_model.routing()  # each layer's (probs, experts)
    aux = torch.stack([load_balancing_loss(probs, experts) for probs, experts in routers]).mean()
    counts = torch.stack([expert_counts(experts, raw_model.config.n_experts) for _, experts in routers])
    return ce, aux, counts


# ---- devices and processes -------------------------------------------------------------


@dataclass
class Process:
    """Where this process trains: its device, the autocast dtype (None: float32), its rank
    and the number of processes (torchrun's RANK and WORLD_SIZE; 0 and 1 without torchrun)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world: int

    @property
    def master(self) -> bool:  # rank 0: prepares the data, logs, writes checkpoints
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()


def setup_process(args) -> Process:
    """This process's device and dtype; joins the torchrun group if there is one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)  # resolved by parse_args: cpu, or cuda with this process's index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return Process(device, torch.bfloat16 if dtype == "bfloat16" else None, rank, world)


def spec_peak_flops(device_name: str) -> float | None:
    """The spec-sheet peak of a GPU named like "NVIDIA A100-SXM4-80GB", None if not in the table."""
    words = set(re.split(r"[^A-Za-z0-9]+", device_name))
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in words), None)


def peak_flops(device, peak_tflops: float | None) -> tuple[float | None, str]:
    """-> (the FLOP/s MFU is relative to, where that figure comes from): --peak-tflops, else the
    spec sheet for known GPUs; (None, why) where no peak is known (CPUs, other GPUs)."""
    if peak_tflops:
        return peak_tflops * 1e12, f"--peak-tflops {peak_tflops:g}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if flops := spec_peak_flops(name):
        return flops, f"the {name}'s dense bf16 peak, {flops / 1e12:g} TFLOP/s (spec sheet)"
    return None, f"MFU n/a: no known peak for {name}; pass --peak-tflops"


def gradient_sync(model, sync: bool):
    """Context for one micro-batch's backward: all-reduce gradients only on the last one."""
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ---- checkpoints -----------------------------------------------------------------------


def save_checkpoint(out_dir: Path, model, optimizer, tokenizer_file: Path, train_state: dict, rank: int) -> None:
    """The weights, tokenizer and train_state.pt (optimizer, step, RNG states, the run's settings)
    as one checkpoint in OUT_DIR, replacing the one there in one step (nano_orion.save)."""
    # Every rank takes part in gathering the full (unsharded) state; rank 0 writes it.
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank != 0:
        return
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    nano_orion.save(
        model,
        out_dir,
        MAX_SHARD_BYTES,
        state_dict=model_state,
        tokenizer=tokenizer_file,
        extra={"train_state.pt": {**train_state, "optimizer": optim_state, "rng": rng}},
    )


def read_train_state(out_dir: Path) -> dict:
    """OUT_DIR's train_state.pt (memory-mapped); CheckpointError if it is missing or damaged."""
    path = out_dir / "train_state.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {out_dir} (train_state.pt missing); train without --resume first")
    try:
        return torch.load(path, weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file fails in torch's zip reader or unpickler, variously
        raise CheckpointError(
            f"{path} is truncated or corrupt ({first_line(e)}); resume from an earlier copy of "
            f"{out_dir}, or start over with --overwrite"
        ) from None


def load_checkpoint(out_dir: Path, state: dict, model, optimizer) -> None:
    """Put OUT_DIR's weights, and `state`'s optimizer and RNG states (its train_state.pt), in place."""
    model_state = dict(read_nano(out_dir)[1])  # one model.safetensors or shards, whichever save wrote
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def truncate_log(log_file: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a run resumes from), and a
    line that does not parse (half-written when a kill interrupted it)."""
    if log_file.exists():
        records = []
        for line in log_file.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        log_file.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


# ---- the pieces of main ------------------------------------------------------------------
# A problem with the command line or its files raises UsageError; main prints it as the one-line
# usage error.


def prepare_data(data, data_dir, vocab_size: int, block_size: int, proc: Process, say):
    """The cached tokenizer and token files for --data in --data-dir: rank 0 prepares (or finds)
    them, the others wait. -> (data folder, train tokens, val tokens), the tokens memory-mapped."""
    try:
        if proc.master:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        folder = prepare(data, data_dir, vocab_size, log=say) if proc.master else None
    except DataError as e:
        raise UsageError(str(e)) from None
    except OSError as e:  # not a folder, read-only (when the data is not prepared there yet), full
        raise UsageError(
            f"--data-dir {data_dir}: cannot write the prepared data there ({e.strerror or e}); "
            "choose another --data-dir"
        ) from None
    if proc.world > 1:
        shared = [folder]
        dist.broadcast_object_list(shared)
        folder = shared[0]
    splits = []
    for name in ("train.bin", "val.bin"):
        try:
            tokens = read_tokens(folder / name)
            check_fills_block(tokens, block_size)
        except DataError as e:
            raise UsageError(f"{folder / name}: {e}") from None
        splits.append(tokens)
    return folder, *splits


def model_config(name: str, n_pieces: int, block_size: int) -> OrionConfig:
    """--config's shape (a preset's name or a JSON file) with the tokenizer's vocabulary (rounded
    up to a multiple of 64)."""
    vocab_size = -(-n_pieces // 64) * 64
    try:
        if name in PRESETS:
            config = OrionConfig.preset(name, vocab_size=vocab_size)
        else:
            config = OrionConfig.from_dict({**json.loads(Path(name).read_text()), "vocab_size": vocab_size})
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid fields
        raise UsageError(f"--config {name}: {e}") from None
    if block_size > config.max_seq_len:
        raise UsageError(f"--block-size {block_size} exceeds the model's max_seq_len {config.max_seq_len}")
    return config


def build_model(config: OrionConfig, proc: Process, fsdp: bool) -> Orion:
    """The model with its initial weights (drawn from the seed set before), on this process's
    device, its experts the fast ones (nano_orion/fast.py)."""
    if not fsdp:
        return accelerate(Orion(config).to(proc.device))
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # Shard an empty (meta) model, then send each rank its shard of the weights rank 0 draws
    # on the CPU, the ones a single process would: no GPU ever holds the whole model (rank
    # 0's host memory does once: 4 bytes a parameter, 190 GB for orion-moe-8x7b).
    with torch.device("meta"):
        model = accelerate(Orion(config))
    for block in model.layers:  # each block's weights are gathered only while it runs
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "loss")  # the loss, too, gathers the weights outside the blocks
    model.to_empty(device=proc.device)
    model.init_rope(proc.device)
    set_model_state_dict(
        model,
        Orion(config).state_dict() if proc.master else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    return model


def resume_settings(args, given: set, saved: dict, step: int) -> list[str]:
    """Put the run's saved settings (train_state.pt's "args") for RUN_FLAGS into `args`. A flag
    that the command line gives with another value is refused, except those in CHANGEABLE,
    which are applied -> what to say of them (for --max-iters, what it does to the schedule)."""
    saved = {**saved, "lr_decay_iters": saved["lr_decay_iters"] or saved["max_iters"]}  # the schedule as planned
    notes = []
    for name in RUN_FLAGS:
        flag, value = "--" + name.replace("_", "-"), getattr(args, name)
        if name not in saved:  # a setting the run did not record: the command line's
            continue
        if name not in given or value == saved[name]:
            setattr(args, name, saved[name])
        elif name not in CHANGEABLE:
            raise UsageError(
                f"--resume: {flag} {value} differs from the run's {saved[name]}, and a resumed run keeps its "
                f"data, model and schedule; leave out {flag}, or start a new run (--overwrite, or another --out-dir)"
            )
        elif name == "max_iters" and value > args.lr_decay_iters:
            notes.append(
                f"--resume: {flag} {value} (the run had {saved[name]}): the learning rate's cosine ends at step "
                f"{args.lr_decay_iters} (--lr-decay-iters), so the steps after it run at its floor, 10% of --lr "
                "(to decay over a longer run, give --lr-decay-iters its final length when starting it)"
            )
        else:
            notes.append(
                f"--resume: {flag} {value} (the run had {saved[name]})"
                + ("; the learning-rate schedule is unchanged" if name == "max_iters" else "")
            )
    if step >= args.max_iters:
        raise UsageError(
            f"--resume: the run in {args.out_dir} already reached step {step} of --max-iters {args.max_iters}; "
            "pass a larger --max-iters to train on"
        )
    return notes


def make_out_dir(out_dir: Path, resume: bool) -> None:
    """OUT_DIR as a writable folder (created for a new run), or a one-line usage error."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir}: a file, not a folder; choose another --out-dir")
    if resume and not out_dir.is_dir():
        raise UsageError(f"--resume: no checkpoint in {out_dir} (no such folder); train without --resume first")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir}: cannot create it ({e.strerror or e}); choose another --out-dir")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--out-dir {out_dir}: not writable; choose another --out-dir, or make it writable")


@contextlib.contextmanager
def holding(out_dir: Path):
    """Hold OUT_DIR while the block runs: an exclusive lock (flock) on OUT_DIR/.lock, which the
    system releases when the process ends, however it ends, so no kill leaves it stuck. Each save
    carries the lock file into the new checkpoint folder as a hard link: the same file, still
    locked. Another run holding it is a one-line usage error."""
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 100, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(
                f"--out-dir {out_dir} is in use by a running train.py ({holder}); wait for it to end, "
                "or choose another --out-dir"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {HOST}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def fresh_start(out_dir: Path, overwrite: bool, say) -> None:
    """A new run in OUT_DIR: refused if the folder holds another run's checkpoint or log, unless
    --overwrite, which deletes them."""
    found = sorted(f.name for f in out_dir.iterdir() if is_checkpoint_file(f.name) or f.name == "log.jsonl")
    if not found:
        return
    parts = (("a checkpoint", any(name != "log.jsonl" for name in found)), ("log.jsonl", "log.jsonl" in found))
    what = " and ".join(part for part, there in parts if there)
    if not overwrite:
        raise UsageError(
            f"--out-dir {out_dir} holds {what} of another run; continue it with --resume, start over with "
            "--overwrite (deletes them), or choose another --out-dir"
        )
    for name in found:
        (out_dir / name).unlink()
    say(f"--overwrite: deleted {what} of the run in {out_dir}")


@contextlib.contextmanager
def deferred_interrupt():
    """While the block runs, Ctrl-C (SIGINT) interrupts nothing: it sets the Event the block gets,
    which the training loop checks between steps. So no step or save is cut in half, and a second
    Ctrl-C during the last save changes nothing (a kill cannot harm a save either: it is atomic)."""
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def train_step(model, raw_model, loss_fn, optimizer, batch, step: int, grad_accum: int, proc: Process):
    """One optimizer step over `grad_accum` micro-batches of the step's global batch, batch(step,
    micro, n_micro) drawing each -> (its cross-entropy and aux loss (2,), routed slots per expert
    (n_layers, n_experts)), left on the device: nothing in a step waits for the host."""
    stats, counts = torch.zeros(2, device=proc.device), 0
    for micro in range(grad_accum):
        x, y = batch(step, micro=micro * proc.world + proc.rank, n_micro=grad_accum * proc.world)
        if proc.device.type == "cuda":  # from pinned memory, a copy does not wait for the GPU to finish its queue
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(proc.device, non_blocking=True), y.to(proc.device, non_blocking=True)
        with gradient_sync(model, sync=micro == grad_accum - 1):
            with proc.autocast():
                ce, aux, c = loss_fn(model, raw_model, x, y)
            ((ce + raw_model.config.router_aux_loss_coef * aux) / grad_accum).backward()
        stats += torch.stack([ce.detach(), aux.detach()]) / grad_accum
        counts = counts + c
    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, counts


class Meter:
    """What a log line says: the latest step's losses, and of the steps since the last line the
    tokens/s, the MFU (against a stated peak FLOP/s, or None) and each layer's share of routed
    slots per expert."""

    def __init__(self, tokens: int, n_active_params: int, peak: float | None, proc: Process):
        self.flops_per_token = 6 * n_active_params  # forward 2N, backward 4N (attention scores left out)
        self.peak, self.proc = peak, proc
        self.stats, self.counts = None, 0
        self.tokens, self.t0 = tokens, time.perf_counter()

    def add(self, stats, counts) -> None:
        """One step's losses (2,) and routed slots (n_layers, n_experts), still on the device."""
        self.stats, self.counts = stats, self.counts + counts

    @contextlib.contextmanager
    def paused(self):
        """Time spent in the block (evaluating, saving) is not training throughput."""
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def record(self, step: int, tokens: int, lr: float) -> dict:
        """The log record (averaged over every process), and start counting anew."""
        stats, counts = self.stats, self.counts
        if self.proc.world > 1:
            dist.all_reduce(stats)
            dist.all_reduce(counts)
            stats /= self.proc.world
        tok_s = (tokens - self.tokens) / (time.perf_counter() - self.t0)
        mfu = tok_s * self.flops_per_token / self.proc.world / self.peak if self.peak else None
        (loss, aux_loss), expert_load = stats.tolist(), (counts / counts.sum(-1, keepdim=True)).tolist()
        self.counts, self.tokens, self.t0 = 0, tokens, time.perf_counter()
        return {
            "kind": "train",
            "step": step,
            "tokens": tokens,
            "loss": loss,
            "aux_loss": aux_loss,
            "lr": lr,
            "tokens_per_s": tok_s,
            "mfu": mfu,
            "expert_load": expert_load,
        }


def log_line(log_file: Path, proc: Process, record: dict) -> None:
    """Append a record to the run's log.jsonl; rank 0 writes the one log of the run."""
    if proc.master:
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def graph_breaks() -> int:
    """How many times torch.compile has split the code it compiled into separate graphs."""
    return sum(torch._dynamo.utils.counters["graph_break"].values())


# ---- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, val, batch_size: int, block_size: int, eval_iters: int, seed: int, proc: Process) -> float:
    """Mean validation cross-entropy over `eval_iters` fixed batches (the same ones every time)."""
    total = 0.0
    for i in range(eval_iters):
        x, y = get_batch(val, batch_size, block_size, seed=seed + 1, step=i)
        with proc.autocast():
            total += model(x.to(proc.device), y.to(proc.device)).item()
    return total / eval_iters


def sample_text(model, tokenizer, prompt_ids, device, n_tokens: int = 96) -> str:
    """A temperature-0.8 continuation of prompt_ids with a fixed seed, to watch learning
    (in float32, the weights' own dtype, which the KV cache takes)."""
    n_tokens = min(n_tokens, model.config.max_seq_len - len(prompt_ids))
    g = torch.Generator(device).manual_seed(0)
    idx = torch.tensor([prompt_ids], device=device)
    out = nano_orion.generate(model, idx, n_tokens, SamplingConfig(temperature=0.8), generator=g)
    return tokenizer.decode(prompt_ids) + "|>" + tokenizer.decode(out[0, len(prompt_ids) :].tolist())


def expert_load_text(expert_load) -> str:
    """Each layer's share of routed slots per expert, in percent, one line a layer."""
    return "  expert load (% of routed slots), layer by layer:\n" + "\n".join(
        f"    {i}: " + " ".join(f"{100 * s:4.1f}" for s in row) for i, row in enumerate(expert_load)
    )


def save(raw_model, optimizer, tokenizer_file: Path, train_state: dict, out_dir: Path, proc: Process, say) -> None:
    """A checkpoint of this step in OUT_DIR, with train_state (the step, tokens and the run's
    settings), and a line in its log."""
    t0 = time.perf_counter()
    save_checkpoint(out_dir, raw_model, optimizer, tokenizer_file, train_state, proc.rank)
    seconds = time.perf_counter() - t0
    step = train_state["step"]
    log_line(out_dir / "log.jsonl", proc, {"kind": "save", "step": step, "folder": str(out_dir), "seconds": seconds})
    say(f"step {step}: saved the checkpoint to {out_dir} in {seconds:.1f} s")


# ---- training --------------------------------------------------------------------------


def main(argv=None):
    """Train as the command line `argv` says; returns the trained model (this process's replica or
    shard). Ctrl-C, a full disk and bad input end the process with one line on stderr."""
    parser, args, given = parse_args(argv)
    torch.set_num_threads(args.threads)
    proc = setup_process(args)
    out_dir = Path(args.out_dir)
    resume = f"to continue from it: python train.py --resume --out-dir {out_dir}"
    try:
        if proc.master:
            make_out_dir(out_dir, args.resume)
        with holding(out_dir) if proc.master else contextlib.nullcontext():
            return train(args, given, proc)
    except UsageError as e:
        parser.error(str(e))
    except KeyboardInterrupt:  # outside the training loop (where Ctrl-C only ends it), or under torchrun
        fail(f"train.py: interrupted; {out_dir} keeps its last checkpoint, if any ({resume})", 130)
    except CheckpointError as e:  # a save that failed (a full disk): the previous checkpoint is unchanged
        fail(f"train.py: error: {e}; {out_dir} keeps its last checkpoint, if any ({resume})", 1)


def fail(message: str, status: int):
    """End the process with one line on stderr."""
    print(message, file=sys.stderr)
    raise SystemExit(status)


def train(args, given: set, proc: Process):
    """main's run, in the OUT_DIR it holds."""
    say = tqdm.write if proc.master else (lambda *a, **k: None)
    out_dir = Path(args.out_dir)
    log_file = out_dir / "log.jsonl"
    if args.resume:  # the run's settings, before the data and model they choose
        try:
            state = read_train_state(out_dir)
            config = read_nano(out_dir)[0]
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None
        notes = resume_settings(args, given, state["args"], state["step"])
    elif proc.master:
        fresh_start(out_dir, args.overwrite, say)

    # Data: the tokenizer and the token files (uint32, memory-mapped).
    data_dir, train_tokens, val_tokens = prepare_data(
        args.data, args.data_dir, args.vocab_size, args.block_size, proc, say
    )
    tokenizer_file = data_dir / "tokenizer.model"
    tokenizer = Tokenizer(tokenizer_file)
    if args.resume and (out_dir / "tokenizer.model").read_bytes() != tokenizer_file.read_bytes():
        raise UsageError(
            f"--resume: the checkpoint in {out_dir} has another tokenizer than --data {args.data} gives "
            "(the text changed?); resume with the run's text, or start a new run"
        )

    # Model: raw_model is the Orion itself (sampled from, checkpointed); model what runs the steps.
    if not args.resume:
        config = model_config(args.config, tokenizer.n_pieces, args.block_size)
    torch.manual_seed(args.seed)
    raw_model = build_model(config, proc, args.fsdp)
    # Every parameter gets a gradient each step (an expert without tokens a zero one): DDP need
    # not look for unused ones.
    model = NextTokenLoss(raw_model)
    if proc.world > 1 and not args.fsdp:
        model = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    loss_fn = torch.compile(losses) if args.compile else losses

    # Optimizer, and where to start: step 0, or --out-dir's checkpoint.
    optimizer = torch.optim.AdamW(
        param_groups(raw_model, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=proc.device.type in ("cpu", "cuda"),
    )
    step, tokens, saved_step = 0, 0, None
    if args.resume:
        try:
            load_checkpoint(out_dir, state, raw_model, optimizer)
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None
        step, tokens, saved_step = state["step"], state["tokens"], state["step"]
        if proc.master:
            truncate_log(log_file, step)
        say(f"resumed from {out_dir} at step {step}")
        for note in notes:
            say(note)

    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * proc.world
    peak, peak_source = peak_flops(proc.device, args.peak_tflops)
    say(
        f"{args.config}: {config.n_params() / 1e6:.2f} M parameters, {config.n_active_params() / 1e6:.2f} M active "
        f"per token, vocab {config.vocab_size}; {proc.world} process(es) on {proc.device}, "
        f"{proc.amp_dtype or torch.float32}, {args.threads} thread(s); {tokens_per_step:,} tokens per step; "
        + (f"MFU relative to {peak_source}" if peak else peak_source)
    )

    def batch(step, micro, n_micro):  # a step's micro-batch: a pure function of (seed, step, micro)
        return get_batch(train_tokens, args.batch_size, args.block_size, args.seed, step, micro=micro, n_micro=n_micro)

    def checkpoint():
        save(
            raw_model,
            optimizer,
            tokenizer_file,
            {"step": step, "tokens": tokens, "args": vars(args)},
            out_dir,
            proc,
            say,
        )

    # The loop: a step; every --log-interval a log line; every --eval-interval an evaluation and a
    # checkpoint. Ctrl-C ends it after the step it lands in (a single process: under torchrun the
    # processes would not agree on which step), and that step is saved.
    # disable=None: a bar only on a terminal, not in logs
    bar = tqdm(
        total=args.max_iters, initial=step, disable=None if proc.master else True, dynamic_ncols=True, desc="train"
    )
    meter = Meter(tokens, config.n_active_params(), peak, proc)
    expert_load = [[1 / config.n_experts] * config.n_experts] * config.n_layers
    with bar, deferred_interrupt() if proc.world == 1 else contextlib.nullcontext(threading.Event()) as interrupted:
        while step < args.max_iters and not interrupted.is_set():
            lr = lr_at(step, args.lr, args.warmup_iters, args.lr_decay_iters or args.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            meter.add(*train_step(model, raw_model, loss_fn, optimizer, batch, step, args.grad_accum, proc))
            step, tokens = step + 1, tokens + tokens_per_step
            bar.update()
            if args.compile and step == 1:
                say(f"torch.compile: the step compiled with {graph_breaks()} graph break(s)")
            if step % args.log_interval == 0 or step == args.max_iters:
                record = meter.record(step, tokens, lr)
                expert_load = record["expert_load"]
                log_line(log_file, proc, record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    tok_s=f"{record['tokens_per_s']:,.0f}",
                    **({"mfu": f"{100 * record['mfu']:.1f}%"} if peak else {}),
                )
            if step % args.eval_interval == 0 or step == args.max_iters:
                with meter.paused():
                    val_loss = evaluate(
                        model, val_tokens, args.batch_size, args.block_size, args.eval_iters, args.seed, proc
                    )
                    log_line(log_file, proc, {"kind": "eval", "step": step, "val_loss": val_loss})
                    say(f"step {step}: val loss {val_loss:.4f}")
                    if not args.fsdp:  # generating token by token would gather every layer each token
                        sample = sample_text(raw_model, tokenizer, val_tokens[:16].tolist(), proc.device)
                        say("  sample: " + sample.replace("\n", "\n  "))
                    say(expert_load_text(expert_load))
                    checkpoint()
                saved_step = step
        if interrupted.is_set() and step != saved_step and step > 0:
            checkpoint()
            saved_step = step
    if interrupted.is_set():
        where = f"saved step {saved_step} in {out_dir}" if saved_step is not None else "nothing to save yet"
        fail(
            f"train.py: interrupted at step {step}; {where}; to continue: python train.py --resume --out-dir {out_dir}",
            130,
        )
    if proc.world > 1:
        dist.barrier()  # rank 0 may still be saving: tear the process group down together
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
