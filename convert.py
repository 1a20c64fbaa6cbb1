"""Convert Orion-MoE weights between the released layout and nano_orion's checkpoint format.

    python convert.py HF_DIR OUT_DIR [--dtype bfloat16]     # released weights -> nano_orion
    python convert.py --to-hf NANO_DIR OUT_DIR              # nano_orion -> released layout

The released folder (config.json + pickled pytorch_model*.bin or model*.safetensors shards)
is read one shard at a time, memory-mapped, pickles with weights_only=True; the output is
written into a temporary folder beside OUT_DIR and renamed at the end. Any problem prints
one line naming the file, the problem and the fix, exits with status 1 and leaves nothing.
"""

import sys

from safetensors import SafetensorError

from nano_orion.checkpoint import MAX_SHARD_BYTES, CheckpointError, first_line
from nano_orion.cli import ArgumentParser, HelpFormatter
from nano_orion.config import DTYPES
from nano_orion.hf_layout import convert_hf, export_hf


def main(argv=None) -> int:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument(
        "src", metavar="SRC_DIR", help="the folder to read: released weights, or with --to-hf a nano_orion checkpoint"
    )
    parser.add_argument(
        "out", metavar="OUT_DIR", help="the folder to write; must not exist (see --force); its parent must"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        metavar="DTYPE",
        help=(
            f"dtype of the written weights: {', '.join(DTYPES)} (default: keep the stored dtype, float16 for the "
            "released weights)"
        ),
    )
    parser.add_argument(
        "--to-hf",
        action="store_true",
        help="export a nano_orion checkpoint to the released layout (safetensors), "
        "loadable where the original loads (and, for RMSNorm models, by transformers' MixtralForCausalLM)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists (only once the new folder is complete)"
    )
    parser.add_argument("--shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9, help="largest output shard, in GB")
    args = parser.parse_args(argv)
    try:
        if args.dtype is not None and args.dtype not in DTYPES:
            raise CheckpointError(f"--dtype {args.dtype}: unsupported; choose one of {', '.join(DTYPES)}")
        if args.shard_gb <= 0:
            raise CheckpointError(f"--shard-gb {args.shard_gb}: must be positive")
        convert = export_hf if args.to_hf else convert_hf
        convert(args.src, args.out, DTYPES.get(args.dtype), max_shard_bytes=int(args.shard_gb * 1e9), force=args.force)
    except CheckpointError as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permission denied, ...: the output folder is already removed
        print(
            f"convert.py: error: {e.filename or args.out}: {e.strerror or e}; fix this and run again", file=sys.stderr
        )
        return 1
    except SafetensorError as e:  # safetensors' own write error, e.g. a disk that filled up after the check
        print(
            f"convert.py: error: {args.out}: writing failed ({first_line(e)}); fix this and run again "
            "(nothing was written)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("convert.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
