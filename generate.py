"""Generate text with an Orion-MoE checkpoint, streaming it to the terminal.

    python generate.py --ckpt CHECKPOINT_DIR --prompt "The capital of France is"
    python generate.py --ckpt CHECKPOINT_DIR                      # interactive: type prompts
    python generate.py --ckpt CHECKPOINT_DIR --chat               # a conversation, turn by turn
    python generate.py --ckpt DIR --device cuda --dtype bfloat16 --quantize int8 --compile

CHECKPOINT_DIR is a nano_orion checkpoint or the released Hugging Face layout, with its
tokenizer.model. The sampling defaults are those of the official Orion-MoE base-model
demo; --temperature 0 gives greedy decoding. The completion streams to stdout (after the
prompt); prompt tokens, time to first token and decode speed go to stderr. Several
--prompt flags run as one left-padded batch and print when all are done. With several
completions (prompts or --num-samples), each one follows a line of its own such as
"──── prompt 2 of 3, sample 1 of 2 ────" and ends with one newline.

--chat holds a conversation in Orion's chat format (nano_orion/conversation.py): type a
message at "you> ", the reply streams back and ends at eos, at the model's own "Human:",
or after --max-new-tokens. The history is kept for the next turn; when it would not fit
in the model's max_seq_len with room for --max-new-tokens, its oldest turns are dropped
(said on stderr). /reset starts over, /exit or Ctrl-D (end of input) leaves.
"""

import re
import sys
import time
from pathlib import Path

import torch

import nano_orion
from nano_orion.cli import THREADS_HELP, ArgumentParser, HelpFormatter, default_threads
from nano_orion.config import DTYPES
from nano_orion.conversation import chat_ids, fit_history
from nano_orion.device import resolve_device
from nano_orion.quantize import quantize_model
from nano_orion.sampler import ORION_DEMO, SamplingConfig, compile_decode_step
from nano_orion.streaming import generate_text

ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}  # what --stop's backslash escapes stand for


def unescape(text: str) -> str:
    r"""\n, \t and \\ -> a newline, a tab and a backslash; any other backslash stays as it is."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--ckpt", required=True, help="checkpoint folder (nano_orion or released layout, with tokenizer.model)"
    )
    p.add_argument("--prompt", action="append", help="prompt text; repeat the flag to run several prompts as one batch")
    p.add_argument("--prompt-file", help="read the prompt from this file (the whole file is one prompt)")
    p.add_argument(
        "--prompt-ids", help="the prompt as comma-separated token ids, e.g. 506,449,232 (for exact reproduction)"
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="a conversation in Orion's chat format: type messages at 'you> ', "
        "/reset starts over, /exit or Ctrl-D leaves",
    )
    p.add_argument(
        "--system", metavar="TEXT", help="with --chat: a system message, put in front of the first user message"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="most tokens to generate per prompt (with --chat, per reply); the longest prompt (the "
        "conversation) plus these must fit in the model's max_seq_len",
    )
    demo = ORION_DEMO
    p.add_argument("--temperature", type=float, default=demo.temperature, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=demo.top_k, help="sample among the k most likely tokens; 0 = all")
    p.add_argument(
        "--top-p",
        type=float,
        default=demo.top_p,
        help="sample among the most likely tokens holding this much probability; 1 = all",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=demo.repetition_penalty,
        help="divide the logits of tokens already present by this; 1 = off",
    )
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=demo.no_repeat_ngram_size,
        help="never repeat an n-gram of this size; 0 = off",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help=r"stop when this text appears (not printed); \n, \t and \\ in it mean a newline, a tab and a "
        r"backslash, so --stop '\n\n' stops at a blank line; repeatable",
    )
    p.add_argument("--seed", type=int, default=1234, help="random seed: the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1, help="how many completions per prompt, one after another")
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda (the first GPU), cuda:N, or auto: cuda if a GPU is visible, else cpu",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, help="weights and activations (default: bfloat16 on cuda, float32 on cpu)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the one-token decode step (on a GPU torch.compile and a CUDA graph, on the CPU a library "
        "compiled ahead of time): compiling takes a while at start (reported, and not counted in the decode speed), "
        "then every step is fast",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: weight-only int8 matmul weights, half of bf16's memory",
    )
    p.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.prompt_ids)) > 1:
        p.error("give only one of --prompt, --prompt-file, --prompt-ids")
    if args.chat:
        not_in_chat = [
            ("--prompt", args.prompt is not None),
            ("--prompt-file", args.prompt_file is not None),
            ("--prompt-ids", args.prompt_ids is not None),
            ("--stop", args.stop != []),
            ("--num-samples", args.num_samples != 1),
        ]
        for flag, given in not_in_chat:
            if given:
                p.error(f"{flag}: not with --chat, whose messages are typed at 'you> '; leave out one of the two")
    elif args.system is not None:
        p.error("--system: only with --chat; add --chat, or put the text in the prompt")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        p.error(f"--prompt-file {args.prompt_file}: no such file; give a text file holding the prompt")
    if args.prompt_ids is not None:
        if not re.fullmatch(r"\s*[0-9]+(\s*,\s*[0-9]+)*\s*", args.prompt_ids):  # spaces only around the commas
            p.error(f"--prompt-ids {args.prompt_ids}: give token ids as comma-separated integers, e.g. 506,449,232")
        args.prompt_ids = [int(i) for i in args.prompt_ids.split(",")]
    args.stop = [unescape(s) for s in args.stop]
    if "" in args.stop:
        p.error("--stop '': an empty stop text matches before the first token; give some text")
    ranges = [  # (flag, value, valid, the valid range in words)
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
        ("--num-samples", args.num_samples, args.num_samples >= 1, "at least 1"),
        ("--temperature", args.temperature, args.temperature >= 0, "0 (greedy) or more"),
        ("--top-k", args.top_k, args.top_k >= 0, "0 (off) or more"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]; 1 = off"),
        ("--repetition-penalty", args.repetition_penalty, args.repetition_penalty > 0, "above 0; 1 = off"),
        ("--no-repeat-ngram-size", args.no_repeat_ngram_size, args.no_repeat_ngram_size >= 0, "0 (off) or more"),
        ("--threads", args.threads, args.threads >= 1, "at least 1"),
    ]
    for flag, value, valid, allowed in ranges:
        if not valid:
            p.error(f"{flag} {value:g}: must be {allowed}")
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        p.error(f"--device {e}")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")]
    return p, args


def load(p, args):
    """(model, tokenizer), or a one-line error naming the problem and the fix."""
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        p.error(f"--ckpt {ckpt}: no such folder; point it at a checkpoint folder")
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


def length_problem(ids: list[list[int]], max_new_tokens: int, max_seq_len: int) -> str | None:
    """Why prompts of these token ids cannot get max_new_tokens new tokens each within the
    model's max_seq_len (the batch is as long as its longest prompt), or None if they can."""
    longest = max(len(i) for i in ids)
    if longest + max_new_tokens <= max_seq_len:
        return None
    which = "the prompt" if len(ids) == 1 else "the longest prompt"
    if longest >= max_seq_len:
        return (
            f"{which} has {longest} tokens, and the model's max_seq_len {max_seq_len} leaves no room for new "
            "ones; shorten it"
        )
    return (
        f"--max-new-tokens {max_new_tokens}: {which} takes {longest} of the model's {max_seq_len} positions "
        f"(max_seq_len), so at most {max_seq_len - longest} new tokens fit"
    )


def command_line_prompts(p, args, tokenizer, config) -> tuple[list[str], list[list[int]]]:
    """The prompts of --prompt, --prompt-file or --prompt-ids as (texts, token ids), or a
    one-line error, before anything is printed, for a prompt that cannot run."""
    if args.prompt_ids is not None:
        if max(args.prompt_ids) >= config.vocab_size:
            p.error(
                f"--prompt-ids: {max(args.prompt_ids)} is not a token id; the vocabulary has {config.vocab_size} "
                f"(ids 0 to {config.vocab_size - 1})"
            )
        texts, ids = [tokenizer.decode(args.prompt_ids)], [args.prompt_ids]
    else:
        if args.prompt_file is not None:
            try:
                texts = [Path(args.prompt_file).read_text(encoding="utf-8")]
            except UnicodeDecodeError as e:
                p.error(f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {e.start}); save it as UTF-8")
        else:
            texts = args.prompt
        ids = [tokenizer.encode(text) for text in texts]
        if not all(ids):
            flag = "--prompt-file" if args.prompt_file is not None else "--prompt"
            p.error(f"{flag}: an empty prompt; give at least one token of text")
    if problem := length_problem(ids, args.max_new_tokens, config.max_seq_len):
        p.error(problem)
    return texts, ids


def heading(prompt: int, n_prompts: int, sample: int, n_samples: int) -> str:
    """The line above one of several completions, e.g. "──── prompt 2 of 3, sample 1 of 2 ────"."""
    parts = [f"prompt {prompt + 1} of {n_prompts}"] if n_prompts > 1 else []
    parts += [f"sample {sample + 1} of {n_samples}"] if n_samples > 1 else []
    return f"──── {', '.join(parts)} ────"


def chat_start(p, args, tokenizer, config) -> list[dict]:
    """The conversation --chat starts from (the --system message, if any), or a one-line error,
    before anything is printed, if not even an empty message would fit with its reply."""
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    room = config.max_seq_len - args.max_new_tokens  # for the conversation, before the reply
    shortest = len(chat_ids(tokenizer, start + [{"role": "user", "content": ""}]))
    if shortest > room:
        with_system = " with --system" if start else ""
        p.error(
            f"--max-new-tokens {args.max_new_tokens}: a turn{with_system} takes at least {shortest} tokens, and the "
            f"model's max_seq_len {config.max_seq_len} leaves room for {max(room, 0)}; ask for fewer new tokens"
            + (" or shorten --system" if start else "")
        )
    return start


def chat_session(p, args, start, model, tokenizer, sampling, generator, decode_step):
    """--chat: read messages at "you> ", stream the replies, keep the history within max_seq_len."""
    max_seq_len = model.config.max_seq_len
    room = max_seq_len - args.max_new_tokens  # for the conversation, before the reply
    history = start
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()  # end the prompt's line
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            history = start
            print("[conversation reset]", file=sys.stderr)
            continue
        if not text.strip():
            continue
        messages = history + [{"role": "user", "content": text}]
        try:
            kept = fit_history(tokenizer, messages, room)
        except ValueError as e:
            print(f"{p.prog}: {e}", file=sys.stderr)
            continue
        if dropped := sum(m["role"] == "user" for m in messages) - sum(m["role"] == "user" for m in kept):
            turns = "turn" if dropped == 1 else f"{dropped} turns"
            print(
                f"[dropped the oldest {turns} to fit the model's max_seq_len {max_seq_len} with room for "
                f"{args.max_new_tokens} new tokens]",
                file=sys.stderr,
            )
        reply = nano_orion.chat(
            model,
            tokenizer,
            kept,
            sampling,
            stream=lambda chunk: print(chunk, end="", flush=True),
            max_new_tokens=args.max_new_tokens,
            generator=generator,
            decode_step=decode_step,
        )
        print(flush=True)
        history = kept + [{"role": "assistant", "content": reply}]


def main(argv=None):
    p, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load(p, args)
    given = args.prompt is not None or args.prompt_file is not None or args.prompt_ids is not None
    texts, ids = command_line_prompts(p, args, tokenizer, model.config) if given else (None, None)
    start = chat_start(p, args, tokenizer, model.config) if args.chat else None
    decode_step = None
    if args.compile:  # compiled for the batch the prompts make (interactive: one at a time), before any text is shown
        t0 = time.perf_counter()
        batch_size, padded = (len(ids), len({len(i) for i in ids}) > 1) if given else (1, False)
        decode_step = compile_decode_step(model, batch_size, padded)
        print(f"[compiled the decode step in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )

    def run(texts, ids):
        """Complete the prompts (texts, as token ids); one streams, several print when all are done."""
        stream, several = len(ids) == 1, len(ids) * args.num_samples > 1
        for sample in range(args.num_samples):
            if stream:
                if several:
                    print(heading(0, 1, sample, args.num_samples))
                print(texts[0], end="", flush=True)
            result = generate_text(
                model,
                tokenizer,
                ids,
                args.max_new_tokens,
                sampling,
                stop=args.stop,
                device=args.device,
                on_text=(lambda b, chunk: print(chunk, end="", flush=True)) if stream else None,
                generator=generator,
                decode_step=decode_step,
            )
            if stream:
                print(flush=True)
            else:
                for b, (text, completion) in enumerate(zip(texts, result.texts)):
                    print(heading(b, len(texts), sample, args.num_samples))
                    print(text + completion, flush=True)
            decoded = sum(result.new_tokens) - len(ids)  # the first tokens come from the prefill
            speed = f" at {decoded / result.decode_time:.1f} tok/s" if decoded > 0 else ""
            print(
                f"[prompt tokens {sum(result.prompt_tokens)}, time to first token {result.time_to_first_token:.3f} s, "
                f"decode {decoded} tokens{speed}]",
                file=sys.stderr,
            )

    try:
        if args.chat:
            chat_session(p, args, start, model, tokenizer, sampling, generator, decode_step)
        elif given:
            run(texts, ids)
        else:  # interactive
            while True:
                try:
                    text = input("prompt> ")
                except EOFError:
                    break
                if not text.strip():
                    continue
                ids = [tokenizer.encode(text)]
                if problem := length_problem(ids, args.max_new_tokens, model.config.max_seq_len):
                    print(f"{p.prog}: {problem}", file=sys.stderr)
                else:
                    run([text], ids)
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
