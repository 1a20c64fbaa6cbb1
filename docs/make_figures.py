"""Draw the figures of docs/ from nano_orion's own code and the committed runs (`make figures`).

    python docs/make_figures.py [--runs docs/runs] [--record-routing CHECKPOINT] [--out docs/figures]

Figures, each computed here, none drawn by hand; the code of each is in docs/plots/:
  moe_block.png        the decoder, one block, and the MoE layer routing one token    architecture.py
  gqa.png              which kv head each query head reads: MHA, GQA, MQA              architecture.py
  kv_cache.png         prefill, then one decode step: the slots of a real KVCache      architecture.py
  rope_angles.png      RoPE's rotation per position and plane (rope_cos_sin)           architecture.py
  attention_masks.png  causal, cached and padded masks (attention_mask)                architecture.py
  attention.png        a trained model's attention heads over a line of code           architecture.py
                       (the small model in docs/trained/)
  dispatch.png         the sorted dispatch of six tokens to their experts              dispatch.py
  router.png           router probabilities and choices, one sentence in four          routing.py
                       languages (RUNS/demo/routing.json)
  collapse.png         expert load with and without the load-balancing loss            routing.py
                       (RUNS/demo/log.jsonl beside RUNS/collapse/log.jsonl)
  loss.png             the demo run's losses and learning rate (RUNS/demo/log.jsonl)   training.py
  expert_load.png      the demo run's expert load (RUNS/demo/log.jsonl)                training.py
  roofline.png         one H100's roofline with Orion's decode and prefill on it       speed.py
  experiments.png      validation loss against compute: dense and MoE variants         experiments.py
                       (RUNS/experiments/*/log.jsonl, `make experiments`)
  specialisation.png   which experts each kind of token goes to, per layer             experiments.py
                       (RUNS/demo/specialisation.json, `make experiments`)

RUNS (default docs/runs) holds the committed runs, each a folder with train.py's log.jsonl
and config.json (`make docs-runs` copies them from make demo's and make collapse-demo's
OUT_DIRs); a figure whose run is missing is skipped, with a message. --record-routing routes
the sentences through a checkpoint (make demo's) and rewrites RUNS/demo/routing.json first.

matplotlib is the optional `docs` extra: pip install -e ".[docs]". The functions that read
data need only torch; those that draw import matplotlib when called.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "docs")]  # nano_orion and docs/plots from the checkout, without installing

from plots.architecture import plot_attention, plot_gqa, plot_kv_cache, plot_masks, plot_moe_block, plot_rope
from plots.dispatch import plot_dispatch
from plots.experiments import plot_experiments, plot_specialisation
from plots.routing import plot_collapse, plot_router
from plots.runs import (
    RUNS,
    byte_groups,
    cache_fill,
    example_routing,
    expert_shares,
    read_routing,
    read_run,
    read_train_log,
    record_routing,
    route_sentence,
    run_config,
)
from plots.speed import H100_SPEC_BYTES_PER_S, H100_SPEC_FLOPS, expected_experts, plot_roofline, roofline_points
from plots.training import plot_expert_load, plot_loss

import nano_orion


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=RUNS,
        help="folder of the committed runs: demo/ and collapse/, each with log.jsonl and config.json "
        "(default: docs/runs)",
    )
    parser.add_argument(
        "--record-routing",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="first route router.png's sentences through this checkpoint folder (with its tokenizer.model) "
        "and write RUNS/demo/routing.json",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs/figures", help="folder for the PNGs (default: docs/figures)"
    )
    args = parser.parse_args(argv)
    checkpoint = args.record_routing
    if checkpoint is not None:
        if not (checkpoint / "config.json").exists():
            parser.error(f"--record-routing {checkpoint}: no config.json there; point at a checkpoint folder")
        if not (checkpoint / "tokenizer.model").exists():
            parser.error(
                f"--record-routing {checkpoint}: no tokenizer.model there; the sentences need it to be encoded "
                "(copy the tokenizer the model was trained with into the folder)"
            )
    demo, collapse = args.runs / "demo", args.runs / "collapse"
    runs = {}
    for name in ("demo", "collapse"):  # read first, so that a bad log leaves no half-made figures
        if (args.runs / name / "log.jsonl").is_file():
            runs[name] = read_run(name, args.runs)
    if checkpoint is not None:
        demo.mkdir(parents=True, exist_ok=True)
        record_routing(checkpoint, demo / "routing.json")
    args.out.mkdir(parents=True, exist_ok=True)

    made = [
        "moe_block.png",
        "gqa.png",
        "kv_cache.png",
        "rope_angles.png",
        "attention_masks.png",
        "attention.png",
        "dispatch.png",
        "roofline.png",
    ]
    plot_moe_block(args.out / "moe_block.png")
    plot_gqa(args.out / "gqa.png")
    plot_kv_cache(args.out / "kv_cache.png")
    plot_rope(args.out / "rope_angles.png")
    plot_masks(args.out / "attention_masks.png")
    plot_attention(args.out / "attention.png")
    plot_dispatch(args.out / "dispatch.png")
    plot_roofline(args.out / "roofline.png")
    if (demo / "routing.json").is_file():
        plot_router(args.out / "router.png", read_routing(demo / "routing.json"))
        made.append("router.png")
    else:
        print(f"no {demo / 'routing.json'}: skipping router.png (--record-routing out/demo writes it)")
    if "demo" not in runs:
        print(
            f"no {demo / 'log.jsonl'}: skipping expert_load.png, loss.png and collapse.png (make demo, then make "
            "docs-runs)"
        )
    else:
        train, evals, config = runs["demo"]
        plot_expert_load(args.out / "expert_load.png", train)
        plot_loss(args.out / "loss.png", train, evals, config)
        made += ["expert_load.png", "loss.png"]
        if "collapse" not in runs:
            print(f"no {collapse / 'log.jsonl'}: skipping collapse.png (make collapse-demo, then make docs-runs)")
        else:
            collapse_train, collapse_evals, _ = runs["collapse"]
            plot_collapse(
                args.out / "collapse.png", train, collapse_train, config and config["top_k"], (evals, collapse_evals)
            )
            made.append("collapse.png")
    if (args.runs / "experiments").is_dir():
        plot_experiments(args.out / "experiments.png", args.runs / "experiments")
        made.append("experiments.png")
    else:
        print(f"no {args.runs / 'experiments'}: skipping experiments.png (make experiments)")
    if (demo / "specialisation.json").is_file():
        plot_specialisation(args.out / "specialisation.png", json.loads((demo / "specialisation.json").read_text()))
        made.append("specialisation.png")
    else:
        print(f"no {demo / 'specialisation.json'}: skipping specialisation.png (make experiments)")
    print(f"wrote {', '.join(made)} to {args.out}")


if __name__ == "__main__":
    main()
