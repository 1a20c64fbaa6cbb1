"""Peak memory of convert.py on a synthetic released-layout checkpoint of a few GB.

    python scripts/convert_memory.py WORK_DIR [--dtype bfloat16] [--layers 12]

Writes fp16 .bin shards of about 1 GB (a layer's experts spread over two shards), converts
them (to bfloat16 by default) with 1 GB output shards in a child process, prints the child's peak RSS
next to the checkpoint's size, and deletes everything it wrote.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from nano_orion import OrionConfig
from nano_orion.checkpoint import expected_shapes
from nano_orion.hf_layout import config_to_hf, nano_name_to_hf


def write_synthetic(folder: Path, config: OrionConfig, shard_bytes: int) -> None:
    """Random fp16 weights in the released layout, one shard in memory at a time."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(config)))
    shapes = expected_shapes(config)
    names = []  # released names and shapes, in the released order: expert 0's w1, w2, w3, expert 1's, ...
    for name, shape in shapes.items():
        if name.endswith("w1"):
            layer = name.removesuffix("w1")
            names += [
                (nano_name_to_hf(layer + w, e), shapes[layer + w][1:])
                for e in range(config.n_experts)
                for w in ("w1", "w2", "w3")
            ]
        elif not name.endswith(("w2", "w3")):
            names.append((nano_name_to_hf(name), shape))
    shards, shard, size = [], {}, 0
    for key, shape in names:
        shard[key] = torch.randn(shape, dtype=torch.float16) * 0.02
        size += shard[key].nbytes
        if size >= shard_bytes or key == names[-1][0]:
            shards.append(shard)
            torch.save(shard, folder / f"pytorch_model-{len(shards):05d}.bin")
            shards[-1] = list(shard)
            shard, size = {}, 0
    n = len(shards)
    weight_map = {}
    for k, keys in enumerate(shards, 1):
        final = f"pytorch_model-{k:05d}-of-{n:05d}.bin"
        (folder / f"pytorch_model-{k:05d}.bin").rename(folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", type=Path, help="an empty folder with room for twice the checkpoint")
    parser.add_argument(
        "--dtype", default="bfloat16", help="convert.py's --dtype (default: bfloat16; float16 keeps the stored dtype)"
    )
    parser.add_argument("--layers", type=int, default=12, help="layers of 403 MB (fp16) each (default: 12, about 5 GB)")
    args = parser.parse_args()
    config = OrionConfig(
        vocab_size=32000, dim=1024, n_layers=args.layers, n_heads=8, n_kv_heads=2, ffn_dim=8192, norm_type="rmsnorm"
    )
    src, out = args.work_dir / "released", args.work_dir / "nano"
    try:
        # In a separate process: a child's peak RSS starts from its parent's, which must stay small.
        writer = multiprocessing.get_context("spawn").Process(target=write_synthetic, args=(src, config, 10**9))
        writer.start()
        writer.join()
        total = sum(f.stat().st_size for f in src.glob("*.bin"))
        root = Path(__file__).parent.parent
        cmd = [sys.executable, str(root / "convert.py"), str(src), str(out), "--dtype", args.dtype, "--shard-gb", "1"]
        convert = subprocess.Popen(cmd)
        # wait4 gives this child's own peak; RUSAGE_CHILDREN would be the largest of all children, the writer's included
        _, status, usage = os.wait4(convert.pid, 0)
        convert.returncode = os.waitstatus_to_exitcode(status)
        if convert.returncode:
            raise subprocess.CalledProcessError(convert.returncode, cmd)
        peak = usage.ru_maxrss * 1024  # Linux reports KiB
        print(
            f"checkpoint {total / 1e9:.2f} GB in {len(list(src.glob('*.bin')))} shards; convert.py peak RSS "
            f"{peak / 1e9:.2f} GB"
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
