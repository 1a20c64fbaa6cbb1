"""Generate text with an Orion-MoE checkpoint, streaming it to the terminal.

    python generate.py --ckpt CHECKPOINT_DIR --prompt "The capital of France is"
    python generate.py --ckpt CHECKPOINT_DIR                      # interactive: type prompts
    python generate.py --ckpt DIR --device cuda --dtype bfloat16 --quantize int8 --compile

CHECKPOINT_DIR is a nano_orion checkpoint or the released Hugging Face layout, with its
tokenizer.model. The sampling defaults are those of the official Orion-MoE base-model
demo; --temperature 0 gives greedy decoding. The completion streams to stdout (after the
prompt); prompt tokens, time to first token and decode speed go to stderr. Several
--prompt flags run as one left-padded batch and print when all are done.
"""

import argparse
import sys
from pathlib import Path

import torch

import nano_orion
from nano_orion.checkpoint import checkpoint_dir
from nano_orion.config import DTYPES
from nano_orion.quantize import quantize_model
from nano_orion.sampler import decode_step_of, generate_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (nano_orion or released layout, with tokenizer.model)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat the flag to run several prompts as one batch")
    p.add_argument("--prompt-file", help="read the prompt from this file (the whole file is one prompt)")
    p.add_argument("--prompt-ids", help="the prompt as comma-separated token ids, e.g. 506,449,232 (for exact reproduction)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per prompt (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=0.85, help="sample among the most likely tokens holding this much probability; 1 = all (default 0.85)")
    p.add_argument("--repetition-penalty", type=float, default=1.05, help="divide the logits of tokens already present by this; 1 = off (default 1.05)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=5, help="never repeat an n-gram of this size; 0 = off (default 5)")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (not printed); repeatable")
    p.add_argument("--seed", type=int, default=1234, help="random seed: the same seed gives the same text (default 1234)")
    p.add_argument("--num-samples", type=int, default=1, help="how many completions per prompt, one after another (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="weights and activations; default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step (slow start, fast steps)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: weight-only int8 matmul weights (half of bf16's memory)")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.prompt_ids)) > 1:
        p.error("give only one of --prompt, --prompt-file, --prompt-ids")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        p.error(f"--prompt-file {args.prompt_file}: no such file; give a text file holding the prompt")
    ranges = [  # (flag, value, valid, the valid range in words)
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
        ("--num-samples", args.num_samples, args.num_samples >= 1, "at least 1"),
        ("--temperature", args.temperature, args.temperature >= 0, "0 (greedy) or more"),
        ("--top-k", args.top_k, args.top_k >= 0, "0 (off) or more"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]; 1 = off"),
        ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0, "above 0; 1 = off"),
        ("--no-repeat-ngram-size", args.no_repeat_ngram_size, args.no_repeat_ngram_size >= 0, "0 (off) or more"),
    ]
    for flag, value, valid, allowed in ranges:
        if not valid:
            p.error(f"{flag} {value:g}: must be {allowed}")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    return p, args


def load(p, args):
    """(model, tokenizer), or a one-line error naming the problem and the fix."""
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        p.error(f"--ckpt {ckpt}: no such folder; point it at a checkpoint folder")
    ckpt = checkpoint_dir(ckpt)  # a save past its commit point (train.py) that a kill kept from its place
    if not (ckpt / "config.json").exists():
        p.error(f"--ckpt {ckpt}: no config.json; point it at a checkpoint folder (nano_orion or released layout)")
    if not (ckpt / "tokenizer.model").exists():
        p.error(f"--ckpt {ckpt}: no tokenizer.model; copy the model's tokenizer files into the folder")
    load_device = "cpu" if args.quantize == "int8" else args.device  # quantize on the way to the device
    try:
        model, tokenizer = nano_orion.load(ckpt, device=load_device, dtype=args.dtype)
    except (nano_orion.CheckpointError, ValueError, KeyError, OSError, RuntimeError) as e:
        p.error(f"--ckpt {ckpt}: cannot load: {e}".splitlines()[0])
    if args.quantize == "int8":
        model = quantize_model(model, device=args.device)
    return model, tokenizer


def main(argv=None):
    p, args = parse_args(argv)
    model, tokenizer = load(p, args)
    decode_step = torch.compile(decode_step_of(model), dynamic=True) if args.compile else None
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sampling = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, generator=generator, decode_step=decode_step,
    )

    def run(prompts):
        stream = len(prompts) == 1
        for sample in range(args.num_samples):
            if sample:
                print()
            if stream:
                shown = prompts[0] if isinstance(prompts[0], str) else tokenizer.decode(prompts[0])
                print(shown, end="", flush=True)
            result = generate_text(
                model, tokenizer, prompts, args.max_new_tokens, stop=args.stop, device=args.device,
                on_text=(lambda b, chunk: print(chunk, end="", flush=True)) if stream else None, **sampling,
            )
            if stream:
                print(flush=True)
            else:
                for prompt, text in zip(prompts, result.texts):
                    print(prompt + text + "\n", flush=True)
            decoded = sum(result.new_tokens) - len(prompts)  # the first tokens come from the prefill
            rate = decoded / result.decode_time if decoded > 0 else float("nan")
            print(
                f"[prompt tokens {sum(result.prompt_tokens)}, time to first token {result.time_to_first_token:.3f} s, "
                f"decode {decoded} tokens at {rate:.1f} tok/s]",
                file=sys.stderr,
            )

    try:
        if args.prompt_ids is not None:
            run([[int(i) for i in args.prompt_ids.split(",")]])
        elif args.prompt_file is not None:
            run([Path(args.prompt_file).read_text()])
        elif args.prompt is not None:
            run(args.prompt)
        else:  # interactive
            while True:
                try:
                    prompt = input("prompt> ")
                except EOFError:
                    break
                if prompt.strip():
                    run([prompt])
    except KeyboardInterrupt:
        print(file=sys.stderr)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
