"""scripts/experiments.py: the runs of walkthrough 11 are the toy model with only its
feed-forward part changed, and each token's kind is what Python's tokenizer says it is."""

import json

import pytest
import torch

from conftest import ROOT, load_script

experiments = load_script("scripts/experiments.py")


def test_the_runs_differ_from_the_demo_only_in_the_feed_forward_layer():
    toy = experiments.OrionConfig.preset("toy")
    moe_active = toy.top_k * toy.ffn_dim  # hidden units a token goes through in the demo's MoE
    configs = {name: experiments.OrionConfig.preset("toy", **fields) for name, fields in experiments.RUNS.items()}
    assert configs["moe-8x256-top2"] == toy
    assert configs["dense-active"].ffn_dim == moe_active and configs["dense-active"].n_experts == 1
    assert configs["dense-total"].ffn_dim == toy.n_experts * toy.ffn_dim and configs["dense-total"].n_experts == 1
    for name, c in configs.items():  # every MoE run has the demo's active size
        if name.startswith("moe"):
            assert c.top_k * c.ffn_dim == moe_active, name
    assert configs["dense-total"].n_params() == pytest.approx(toy.n_params(), rel=1e-3)  # the router's few weights


def test_char_kinds_follow_pythons_tokenizer():
    source = "def f(x):\n    return x + 12  # twelve\ns = 'a b'\nt = f'{x + 1:>3}!'\n"
    kinds = experiments.char_kinds(source)

    def kind_of(text, nth=0):
        return kinds[[i for i in range(len(source)) if source.startswith(text, i)][nth]]

    assert kind_of("def") == "keyword" and kind_of("return") == "keyword"
    assert kind_of("f(") == "identifier" and kind_of("x") == "identifier"
    assert kind_of("(") == "punctuation" and kind_of("+") == "punctuation"
    assert kind_of("12") == "digits" and kind_of("# twelve") == "comments" and kind_of("'a b'") == "strings"
    assert kind_of("    return") == "indentation and spaces"
    fstring = source.index("f'{x")
    assert set(kinds[fstring : fstring + len("f'{x + 1:>3}!'")]) == {"strings"}  # whole, in every Python


def test_piece_kinds_place_every_piece_on_the_source():
    import nano_orion

    _, tokenizer = nano_orion.load(ROOT / "docs" / "trained")
    source = "    if value is None:\n        return 0\n"
    ids, kinds = experiments.piece_kinds(tokenizer, source)
    assert ids == tokenizer.encode(source) and len(kinds) == len(ids)
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids]
    assert all(k == "indentation and spaces" for p, k in zip(pieces, kinds) if set(p) <= {"▁"})
    assert kinds[pieces.index("0")] == "digits" if "0" in pieces else True
    assert set(kinds) >= {"keyword", "identifier", "punctuation", "indentation and spaces"}


def test_specialisation_counts_every_routed_slot(tmp_path):
    text = tmp_path / "code.py"
    text.write_text(
        "".join(f"def f{i}(x, y={i}):\n    # add\n    return x + y * 'ab'.count('a')\n\n" for i in range(30))
    )
    record = experiments.specialisation(ROOT / "docs" / "trained", text, block=128)
    slots = torch.tensor(record["slots"])  # (layers, kinds, experts)
    assert slots.shape == (2, len(experiments.KINDS), 8)
    assert (
        slots.sum((1, 2)) == sum(record["tokens"]) * record["top_k"]
    ).all()  # every token's top_k slots, in every layer
    assert (slots.sum(-1) == torch.tensor(record["tokens"]) * record["top_k"]).all()
    control = torch.tensor(record["control_slots"])  # the same slots, grouped by position
    assert (control.sum(1) == slots.sum(1)).all() and sum(record["control_tokens"]) == sum(record["tokens"])
    json.dumps(record)  # what the script writes
