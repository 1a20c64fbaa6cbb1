"""Every number the pages quote from the committed runs (docs/runs/) is recomputed here from
those runs, so that a quote cannot drift from the data behind it: changing one digit of a quote,
or committing other runs (`make docs-runs`), fails this test and names the quote.

QUOTES lists, per page, a passage as the page writes it with each quoted number as {}, and a
function of the runs that gives those numbers as the page prints them. Line breaks and runs of
spaces in the page do not matter.
"""

import json
import math
import re
from collections import Counter

import pytest
import torch

from conftest import ROOT, load_script

make_figures = load_script("docs/make_figures.py")
DEMO_TRAIN, DEMO_EVALS, DEMO_CONFIG = make_figures.read_run("demo")
COLLAPSE_TRAIN, COLLAPSE_EVALS, _ = make_figures.read_run("collapse")
ROUTING = make_figures.read_routing(make_figures.RUNS / "demo" / "routing.json")


# ---- what the quotes are made of -----------------------------------------------------------


def at(records, step, key):
    return next(r[key] for r in records if r["step"] == step)


def steps(records, first=0, last=math.inf):
    return [r for r in records if first <= r["step"] <= last]


def shares(records, first=0, last=math.inf) -> torch.Tensor:
    """(steps, layers, experts): each expert's share of its layer's slots, over the steps asked for."""
    return make_figures.expert_shares(steps(records, first, last))[1]


def pct(x, digits=2):
    return f"{100 * x:.{digits}f}%"


def f(x, digits):
    return f"{x:.{digits}f}"


def starved(records=COLLAPSE_TRAIN, first=210, below=0.01):
    """(layer, expert) of the experts under `below` of their layer's slots at every logged step from `first` on."""
    s = shares(records, first)
    return [(layer, e) for layer in range(s.shape[1]) for e in range(s.shape[2]) if s[:, layer, e].max() < below]


def collapse_starved():
    experts = starved()
    assert Counter(layer for layer, _ in experts) == {1: 2, 2: 2}  # "two of layer 1 and two of layer 2"
    s = shares(COLLAPSE_TRAIN, 210)
    values = torch.stack([s[:, layer, e] for layer, e in experts])
    # the last step at which one of them had 1% or more
    full = shares(COLLAPSE_TRAIN)
    logged = [r["step"] for r in COLLAPSE_TRAIN]
    last = max(logged[i] for layer, e in experts for i in range(len(logged)) if full[i, layer, e] >= 0.01)
    return len(experts), pct(values.min()), pct(values.max()), last


def busiest(records, layer, first):
    """(expert, min share, max share) of the layer's busiest expert, the same one at every step from `first`."""
    s = shares(records, first)[:, layer]
    top = s.argmax(-1).unique()
    assert len(top) == 1, f"layer {layer}'s busiest expert changes: {top.tolist()}"
    return top.item(), f(s[:, top.item()].min(), 3), f(s[:, top.item()].max(), 3)


def first_lopsided(records=COLLAPSE_TRAIN, layers=(1, 2, 3), below=0.01):
    """The first logged step by which every one of the layers has an expert under `below`."""
    return max(next(r["step"] for r in records if min(r["expert_load"][layer]) < below) for layer in layers)


def idlest_before(records, last, layers=(1, 2, 3)):
    s = shares(records, 0, last - 1)
    return tuple(pct(s[:, layer].min()) for layer in layers)


def load_range(records, first, layers=None, digits=1):
    s = shares(records, first)
    s = s if layers is None else s[:, layers]
    return pct(s.min(), digits), pct(s.max(), digits)


def aux_range(records, first, last=math.inf):
    values = [r["aux_loss"] for r in steps(records, first, last)]
    return f(min(values), 2), f(max(values), 2)


def loss_range(records, first, last=math.inf):
    values = [r["loss"] for r in steps(records, first, last)]
    return f(min(values), 2), f(max(values), 2)


def largest_rise_after(records, first):
    """The largest rise of the training loss between two logged steps from `first` on."""
    pairs = list(zip(steps(records, first), steps(records, first)[1:]))
    a, b = max(pairs, key=lambda p: p[1]["loss"] - p[0]["loss"])
    return f(a["loss"], 2), a["step"], f(b["loss"], 2), b["step"]


def router_rows(layer):
    """(language, pieces, probs, experts) of each recorded sentence in one layer."""
    return [(lang, s["pieces"], *s["layers"][layer]) for lang, s in ROUTING["sentences"].items()]


def mean_top_probability():
    means = [probs.max(-1).values.mean().item() for layer in (0, 3) for _, _, probs, _ in router_rows(layer)]
    highest = max(probs.max().item() for layer in (0, 3) for _, _, probs, _ in router_rows(layer))
    return f(min(means), 3), f(max(means), 3), f(highest, 3)


def chosen_count(lang, layer, expert):
    _, pieces, _, experts = next(row for row in router_rows(layer) if row[0] == lang)
    return int((experts == expert).any(-1).sum()), len(pieces)


def favourite(lang, layer):
    _, _, _, experts = next(row for row in router_rows(layer) if row[0] == lang)
    return Counter(experts.flatten().tolist()).most_common(1)[0][0]


def repeated_first_choice(lang, layer):
    _, _, _, experts = next(row for row in router_rows(layer) if row[0] == lang)
    first = experts[:, 0]
    return f"{(first[1:] == first[:-1]).float().mean().item():.0%}"


def distinct_experts(lang, layer):
    _, pieces, _, experts = next(row for row in router_rows(layer) if row[0] == lang)
    return len(pieces), len(experts.unique())


def experiment(name):
    return make_figures.read_run(name, make_figures.RUNS / "experiments")[:2] + (
        make_figures.nano_orion.OrionConfig.from_dict(
            make_figures.read_run(name, make_figures.RUNS / "experiments")[2]
        ),
    )


def final(name):
    return f(at(experiment(name)[1], 300, "val_loss"), 3)


SPECIALISATION = json.loads((make_figures.RUNS / "demo" / "specialisation.json").read_text())


def kind_shares(key="slots"):
    slots = torch.tensor(SPECIALISATION[key], dtype=torch.float64)
    return slots / slots.sum(-1, keepdim=True), slots


def kind_dependence_range(key, tokens_key):
    shares, slots = kind_shares(key)
    tokens = torch.tensor(SPECIALISATION[tokens_key], dtype=torch.float64)
    overall = slots.sum(1) / slots.sum((1, 2))[:, None]
    moved = ((0.5 * (shares - overall[:, None]).abs().sum(-1)) * tokens).sum(-1) / tokens.sum()
    return f(moved.min(), 3), f(moved.max(), 3)


def favourite_of(layer, kind):
    shares, _ = kind_shares()
    row = shares[layer, SPECIALISATION["kinds"].index(kind)]
    return row.argmax().item(), f(row.max(), 2)


def strings_spread():
    shares, _ = kind_shares()
    favourites = shares.max(-1).values  # (layers, kinds)
    strings = favourites[:, SPECIALISATION["kinds"].index("strings")]
    assert all(strings.max() <= favourites[:, k].max() for k in range(favourites.shape[1]))  # the most even kind
    return f(strings.min(), 2), f(strings.max(), 2)


# ---- the quotes ------------------------------------------------------------------------------

MOE, TRAINING, EXPERTS = "docs/05_moe.md", "docs/08_training.md", "docs/11_experts_measured.md"
QUOTES = [
    # walkthrough 5: the run without the load-balancing loss beside the demo run
    (MOE, "layers 1 to 3 become lopsided within the first {} steps", lambda: (first_lopsided(),)),
    (
        MOE,
        "Over the last 100 steps (210 to 300) {} experts, two of layer 1 and two of layer 2, get less than 1% of "
        "their layer's slots ({} to {}); none of them got 1% again after step {}.",
        collapse_starved,
    ),
    (MOE, "expert {} of layer 3 takes {} to {} of its layer's slots", lambda: busiest(COLLAPSE_TRAIN, 3, 210)),
    (MOE, "expert {} of layer 1 takes {} to {}", lambda: busiest(COLLAPSE_TRAIN, 1, 210)),
    (
        MOE,
        "Layer 0 stays nearer balance ({} to {} per expert from step 50 on)",
        lambda: load_range(COLLAPSE_TRAIN, 50, [0]),
    ),
    (
        MOE,
        "before step 100 the idlest expert of layers 1, 2 and 3 falls to {}, {} and {} of the slots",
        lambda: idlest_before(DEMO_TRAIN, 100),
    ),
    (MOE, "from step 100 on every expert of every layer gets {} to {}", lambda: load_range(DEMO_TRAIN, 100)),
    (
        MOE,
        "from step 100 on it stays between {} and {} in the demo run, against {} to {} in the run that ignores it",
        lambda: aux_range(DEMO_TRAIN, 100) + aux_range(COLLAPSE_TRAIN, 100),
    ),
    (
        MOE,
        "The validation losses at step 300 are {} with the loss and {} without",
        lambda: (f(at(DEMO_EVALS, 300, "val_loss"), 3), f(at(COLLAPSE_EVALS, 300, "val_loss"), 3)),
    ),
    (
        MOE,
        "the training losses differ by at most {} at any logged step",
        lambda: (f(max(abs(a["loss"] - b["loss"]) for a, b in zip(DEMO_TRAIN, COLLAPSE_TRAIN)), 2),),
    ),
    (
        MOE,
        "(here {} of the 32 experts, {} of the expert weights)",
        lambda: (len(starved()), pct(len(starved()) / 32, 1)),
    ),
    (
        MOE,
        "the one holding layer 3's expert {}, with {} times its share of the tokens",
        lambda: (busiest(COLLAPSE_TRAIN, 3, 210)[0], f(shares(COLLAPSE_TRAIN, 210)[:, 3].max() * 8, 2)),
    ),
    (
        MOE,
        "of the {} starved experts came back",
        lambda: (["zero", "one", "two", "three", "four", "five"][len(starved())],),
    ),
    # walkthrough 5: the router of the demo model
    (
        MOE,
        "A token's highest probability is {} to {} on average per sentence and layer, and {} at most",
        mean_top_probability,
    ),
    (MOE, "the English sentence's {} tokens use {} of the 8 experts", lambda: distinct_experts("English", 0)),
    (
        MOE,
        "expert 7 is among the two chosen for {} of the {} Chinese tokens, {} of the {} Japanese, {} of the {} Korean "
        "(whose favourite is expert {}, {} of {}) and {} of the {} English ones",
        lambda: (
            *chosen_count("Chinese", 3, 7),
            *chosen_count("Japanese", 3, 7),
            *chosen_count("Korean", 3, 7),
            favourite("Korean", 3),
            *chosen_count("Korean", 3, favourite("Korean", 3)),
            *chosen_count("English", 3, 7),
        ),
    ),
    (
        MOE,
        "the previous token's in {} of the pairs in layer 0 and {} in layer 3",
        lambda: (repeated_first_choice("Japanese", 0), repeated_first_choice("Japanese", 3)),
    ),
    # walkthrough 8: the demo run
    (
        TRAINING,
        "The training loss starts at {} at step 10, already below the uniform guess's {}",
        lambda: (f(at(DEMO_TRAIN, 10, "loss"), 2), f(math.log(DEMO_CONFIG["vocab_size"]), 2)),
    ),
    (TRAINING, "to {} to {} over steps 80 to 100", lambda: loss_range(DEMO_TRAIN, 80, 100)),
    (
        TRAINING,
        "to {} to {} over the last 50 steps ({} at step 300)",
        lambda: loss_range(DEMO_TRAIN, 251) + (f(at(DEMO_TRAIN, 300, "loss"), 2),),
    ),
    (TRAINING, "hence jumps such as {} at step {} to {} at step {}", lambda: largest_rise_after(DEMO_TRAIN, 100)),
    (
        TRAINING,
        "goes {} → {} → {} at steps 100, 200 and 300",
        lambda: tuple(f(at(DEMO_EVALS, s, "val_loss"), 2) for s in (100, 200, 300)),
    ),
    (TRAINING, "The aux loss is {} to {} in the first 70 steps", lambda: aux_range(DEMO_TRAIN, 0, 70)),
    (TRAINING, "from step 110 on stays between {} and {}", lambda: aux_range(DEMO_TRAIN, 110)),
    (
        TRAINING,
        "before step 100 the idlest expert of layers 1, 2 and 3 falls to {}, {} and {} of the slots at its lowest, "
        "while the busiest takes up to {}",
        lambda: idlest_before(DEMO_TRAIN, 100) + (f(shares(DEMO_TRAIN, 0, 99).max(), 3),),
    ),
    (
        TRAINING,
        "from step 100 on every expert of every layer gets between {} and {}",
        lambda: load_range(DEMO_TRAIN, 100),
    ),
    (TRAINING, "Layer 0 was never far off ({} to {})", lambda: load_range(DEMO_TRAIN, 0, [0])),
    # walkthrough 11: the experiments and the demo model's routing per kind of token
    (
        EXPERTS,
        "the dense model of the MoE's active size reaches a validation loss of {} and the demo's mixture "
        "(8 × 256, top-2) {}, for the same FLOPs: the mixture holds {} times the parameters and is {} worse",
        lambda: (
            final("dense-active"),
            final("moe-8x256-top2"),
            f(experiment("moe-8x256-top2")[2].n_params() / experiment("dense-active")[2].n_params(), 1),
            f(float(final("moe-8x256-top2")) - float(final("dense-active")), 3),
        ),
    ),
    (
        EXPERTS,
        "The dense model of the MoE's total size, at {} times the compute, reaches {}, only {} better",
        lambda: (
            f(experiment("dense-total")[2].n_active_params() / experiment("dense-active")[2].n_active_params(), 1),
            final("dense-total"),
            f(float(final("dense-active")) - float(final("dense-total")), 3),
        ),
    ),
    (EXPERTS, "Top-1 is clearly worse: {}.", lambda: (final("moe-8x512-top1"),)),
    (
        EXPERTS,
        "4, 8 or 16 experts at the same active size: {}, {} and {}.",
        lambda: tuple(final(f"moe-{n}x256-top2") for n in (4, 8, 16)),
    ),
    (
        EXPERTS,
        "In every layer, between {} and {} of the slots would go to another expert if every kind were routed "
        "like the layer as a whole, against {} to {} when the same tokens are grouped by position",
        lambda: kind_dependence_range("slots", "tokens") + kind_dependence_range("control_slots", "control_tokens"),
    ),
    (
        EXPERTS,
        "in layer 3 expert {} receives {} of the identifiers' slots and expert {} {} of the indentation's, and in "
        "layer 1 expert {} takes {} of the keywords'",
        lambda: favourite_of(3, "identifier") + favourite_of(3, "indentation and spaces") + favourite_of(1, "keyword"),
    ),
    (
        EXPERTS,
        "Strings, which hold text of every sort, are spread most evenly (their favourite expert gets {} to {} of "
        "their slots)",
        strings_spread,
    ),
    (
        "README.md",
        "the validation loss falls from {} (= ln 4096, guessing) to {} in the committed run",
        lambda: (f(math.log(4096), 1), f(at(DEMO_EVALS, 300, "val_loss"), 2)),
    ),
]


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("page, passage, numbers", QUOTES, ids=[f"{p}: {q[:40]}" for p, q, _ in QUOTES])
def test_the_page_quotes_what_the_committed_runs_say(page, passage, numbers):
    want = passage.format(*numbers())
    assert want in normalised((ROOT / page).read_text()), f"{page} should say: {want!r}"


def test_a_changed_digit_is_caught():
    page, passage, numbers = QUOTES[1]
    text = normalised((ROOT / page).read_text())
    quoted = passage.format(*numbers())
    changed = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), quoted, count=1)
    assert quoted in text and changed not in text
