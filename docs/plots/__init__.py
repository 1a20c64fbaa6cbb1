"""The code that draws docs/figures/*.png, one module per family of figures.

    style.py         matplotlib set-up (fonts, the CJK font), colours, boxes and arrows
    runs.py          reading the committed runs (docs/runs/): train.py's logs, the router record
    architecture.py  moe_block.png, gqa.png, kv_cache.png, rope_angles.png, attention_masks.png,
                     attention.png
    routing.py       router.png, collapse.png (and the expert-load heatmap expert_load.png shares)
    training.py      loss.png, expert_load.png
    dispatch.py      dispatch.png: the sorted dispatch of six tokens
    speed.py         roofline.png
    experiments.py   experiments.png, specialisation.png: what the experts buy (walkthrough 11)

docs/make_figures.py is the command that calls them (`make figures`).
"""
