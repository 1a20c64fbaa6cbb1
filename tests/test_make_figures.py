"""docs/make_figures.py reads train.py's log.jsonl correctly, rejects bad logs clearly, and draws.

The logs here are synthetic, written to a temporary folder: they test the reader and the
plots, and their figures are never kept.
"""

import json

import pytest
import torch

from conftest import FIXTURES, load_script

make_figures = load_script("docs/make_figures.py")


def train_record(step, load):
    return {
        "kind": "train",
        "step": step,
        "tokens": 1024 * step,
        "loss": 8.0 - step / 10,
        "aux_loss": 2.1,
        "lr": 3e-4,
        "tokens_per_s": 5000.0,
        "mfu": 0.01,
        "expert_load": load,
    }


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_train_log_splits_sorts_and_normalises(tmp_path):
    # 2 layers, 4 experts; counts in one record, fractions in the other, steps out of order.
    log = write_log(
        tmp_path / "log.jsonl",
        [
            train_record(20, [[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]]),
            {"kind": "eval", "step": 10, "val_loss": 7.5},
            {"kind": "save", "step": 10, "folder": "out", "seconds": 0.5},  # skipped
            train_record(10, [[6, 2, 0, 0], [1, 1, 1, 1]]),
        ],
    )
    train, evals = make_figures.read_train_log(log)
    assert [r["step"] for r in train] == [10, 20] and evals == [{"kind": "eval", "step": 10, "val_loss": 7.5}]
    steps, shares = make_figures.expert_shares(train)
    assert steps.tolist() == [10, 20]
    expected = torch.tensor([[[0.75, 0.25, 0, 0], [0.25] * 4], [[0.25] * 4, [0.5, 0.5, 0, 0]]], dtype=torch.float64)
    torch.testing.assert_close(shares, expected)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "not JSON"),
        ('{"kind": "train", "step": 1}', "lacks"),
        ('{"kind": "eval", "step": 1}', "lacks ['val_loss']"),
        ('{"kind": "other"}', "kind must be"),
    ],
)
def test_read_train_log_names_the_bad_line(tmp_path, line, problem):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(train_record(1, [[1, 1]])) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"log.jsonl:2: .*{problem}".replace("[", r"\[").replace("]", r"\]")):
        make_figures.read_train_log(log)


def test_read_train_log_needs_train_records(tmp_path):
    log = write_log(tmp_path / "log.jsonl", [{"kind": "eval", "step": 1, "val_loss": 3.0}])
    with pytest.raises(ValueError, match="no train records"):
        make_figures.read_train_log(log)


def test_route_sentence_matches_transformers_routing():
    from nano_orion.hf_mixtral import to_mixtral

    model, tokenizer = make_figures.nano_orion.load(FIXTURES / "orion-mini-rmsnorm")
    sentence = "今天天气很好。"
    pieces, routers = make_figures.route_sentence(model, tokenizer, sentence)
    assert "".join(pieces).replace("▁", " ").strip().startswith("<0xE4>")  # byte fallback for 今
    # the reference: the router logits of transformers' Mixtral on the same weights
    with torch.no_grad():
        hf_logits = to_mixtral(model)(
            torch.tensor([tokenizer.encode(sentence)]), output_router_logits=True
        ).router_logits
    assert len(routers) == len(hf_logits) == model.config.n_layers
    for (probs, experts), logits in zip(routers, hf_logits):
        hf_probs = logits.softmax(dim=-1)
        assert probs.shape == (len(pieces), model.config.n_experts)
        torch.testing.assert_close(probs, hf_probs, rtol=0, atol=1e-5)
        hf_experts = hf_probs.topk(model.config.top_k, dim=-1).indices
        assert torch.equal(experts.sort(dim=-1).values, hf_experts.sort(dim=-1).values)


def test_byte_groups_finds_the_characters_that_byte_tokens_spell():
    pieces = [
        "▁",
        "<0xE4>",
        "<0xBB>",
        "<0x8A>",
        "a",
        "<0xC3>",
        "<0xAF>",
        "<0xF0>",
        "<0x9F>",
        "<0x98>",
        "<0x80>",
        "<0xE4>",
    ]
    assert make_figures.byte_groups(pieces) == [(1, 3, "今"), (5, 6, "ï"), (7, 10, "😀")]  # the last byte is incomplete


def test_example_routing_and_cache_fill_read_the_real_code():
    probs, experts, weights = make_figures.example_routing()
    assert torch.equal(experts, probs.topk(2).indices)
    torch.testing.assert_close(weights, probs[experts] / probs[experts].sum())
    after_prefill, after_decode = make_figures.cache_fill(prompt_len=5, max_len=8)
    assert after_prefill.tolist() == [True] * 5 + [False] * 3
    assert after_decode.tolist() == [True] * 6 + [False] * 2


def test_main_draws_every_figure_and_skips_those_whose_runs_are_missing(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    make_figures.main(["--out", str(out), "--runs", str(tmp_path / "no-runs")])
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.png",
        "attention_masks.png",
        "dispatch.png",
        "gqa.png",
        "kv_cache.png",
        "moe_block.png",
        "roofline.png",
        "rope_angles.png",
    ]
    printed = capsys.readouterr().out
    assert "skipping router.png" in printed and "skipping expert_load.png, loss.png and collapse.png" in printed
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def skip_the_figures_of_the_first_test(monkeypatch):
    """The figures that need no run are drawn and checked by the first test; later tests skip them."""
    for name in (
        "plot_moe_block",
        "plot_gqa",
        "plot_kv_cache",
        "plot_rope",
        "plot_masks",
        "plot_attention",
        "plot_dispatch",
        "plot_roofline",
    ):
        monkeypatch.setattr(make_figures, name, lambda *args: None)


def test_record_routing_writes_what_the_router_did_and_router_png_draws_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    skip_the_figures_of_the_first_test(monkeypatch)
    runs, out = tmp_path / "runs", tmp_path / "figures"
    make_figures.main(
        ["--out", str(out), "--runs", str(runs), "--record-routing", str(FIXTURES / "orion-mini-rmsnorm")]
    )
    assert "router.png" in capsys.readouterr().out and (out / "router.png").read_bytes()[:4] == b"\x89PNG"
    record = make_figures.read_routing(runs / "demo" / "routing.json")
    model, tokenizer = make_figures.nano_orion.load(FIXTURES / "orion-mini-rmsnorm")
    sentence = record["sentences"]["Chinese"]
    pieces, routers = make_figures.route_sentence(model, tokenizer, sentence["text"])
    assert sentence["pieces"] == pieces and len(sentence["layers"]) == model.config.n_layers
    for (probs, experts), (want_probs, want_experts) in zip(sentence["layers"], routers):
        torch.testing.assert_close(probs, want_probs, rtol=0, atol=1e-5)  # kept to 5 decimals
        assert torch.equal(experts, want_experts)


def test_roofline_points_place_decode_left_of_the_ridge_and_prefill_right():
    """Batch-1 decode does 2 FLOPs per weight it reads: 1 per byte in bf16, 2 in int8 (less
    the scales); 64 streams read nearly every expert, so still far below the ridge; a 4k
    prompt reads every expert once for 4096 tokens, far above it."""
    assert make_figures.expected_experts(1) == 2
    assert make_figures.expected_experts(8) == pytest.approx(7.199, abs=1e-3)
    assert make_figures.expected_experts(64) == pytest.approx(8, abs=1e-6)
    points = dict(make_figures.roofline_points())
    ridge = make_figures.H100_SPEC_FLOPS / make_figures.H100_SPEC_BYTES_PER_S
    assert ridge == pytest.approx(295, abs=1)
    assert points["decode, batch 1, bf16"] == pytest.approx(1.0, rel=1e-3)
    assert points["decode, batch 1, int8"] == pytest.approx(2.0, rel=2e-3) and points["decode, batch 1, int8"] < 2
    assert 10 < points["decode, batch 64, bf16"] < 64 < ridge  # less than a dense model's 64: every expert is read
    assert points["prefill, 4096 tokens, bf16"] > 3 * ridge


def test_training_figures_draw_from_two_logs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    skip_the_figures_of_the_first_test(monkeypatch)
    g = torch.Generator().manual_seed(0)
    runs = {}
    for name in ("demo", "collapse"):
        records = [train_record(s, torch.rand(4, 8, generator=g).tolist()) for s in range(5, 55, 5)]
        (tmp_path / name).mkdir()
        runs[name] = write_log(tmp_path / name / "log.jsonl", records + [{"kind": "eval", "step": 50, "val_loss": 3.5}])
    # the run's config.json beside its log gives loss.png its reference lines
    (tmp_path / "demo" / "config.json").write_text(json.dumps({"config": {"vocab_size": 4096, "top_k": 2}}))
    assert make_figures.run_config(runs["demo"]) == {"vocab_size": 4096, "top_k": 2}
    assert make_figures.run_config(runs["collapse"]) is None
    out = tmp_path / "figures"
    make_figures.main(["--out", str(out), "--runs", str(tmp_path)])
    assert (
        "wrote moe_block.png, gqa.png, kv_cache.png, rope_angles.png, attention_masks.png, attention.png, "
        "dispatch.png, roofline.png, expert_load.png, loss.png, collapse.png"
    ) in capsys.readouterr().out
    for name in ("expert_load.png", "loss.png", "collapse.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_committed_runs_are_train_logs_of_the_same_shape():
    demo, collapse = make_figures.read_run("demo"), make_figures.read_run("collapse")
    assert demo[2]["router_aux_loss_coef"] == 0.01 and collapse[2]["router_aux_loss_coef"] == 0.0
    assert [r["step"] for r in demo[0]] == [r["step"] for r in collapse[0]] == list(range(10, 301, 10))
    assert {k: v for k, v in demo[2].items() if k != "router_aux_loss_coef"} == {
        k: v for k, v in collapse[2].items() if k != "router_aux_loss_coef"
    }


def test_collapse_figure_needs_runs_of_the_same_shape(tmp_path):
    pytest.importorskip("matplotlib")
    a = [train_record(s, [[1] * 8] * 4) for s in (5, 10)]
    b = [train_record(s, [[1] * 4] * 4) for s in (5, 10)]
    with pytest.raises(ValueError, match=r"different shapes: \(4, 8\) and \(4, 4\)"):
        make_figures.plot_collapse(tmp_path / "collapse.png", a, b)


def test_main_rejects_a_checkpoint_without_tokenizer_before_drawing(tmp_path, capsys):
    checkpoint = tmp_path / "no-tokenizer"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text((FIXTURES / "orion-mini-rmsnorm" / "config.json").read_text())
    out = tmp_path / "figures"
    with pytest.raises(SystemExit):
        make_figures.main(["--out", str(out), "--record-routing", str(checkpoint)])
    assert "no tokenizer.model" in capsys.readouterr().err
    assert not out.exists()


def test_main_rejects_a_bad_log_before_drawing(tmp_path):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "log.jsonl").write_text("{not json\n")
    out = tmp_path / "figures"
    with pytest.raises(ValueError, match="not JSON"):
        make_figures.main(["--out", str(out), "--runs", str(tmp_path / "runs")])
    assert not out.exists()


def test_a_cjk_font_is_used_when_installed_and_its_absence_is_warned(monkeypatch):
    pytest.importorskip("matplotlib")
    import sys

    style = sys.modules["plots.style"]
    style.cjk_font.cache_clear()
    monkeypatch.setattr(style, "CJK_FONTS", ("No Such Font",))
    with pytest.warns(UserWarning, match="fonts-noto-cjk"):
        assert style.cjk_font() is None
    monkeypatch.undo()
    style.cjk_font.cache_clear()
    style.charmaps.cache_clear()
    font = style.cjk_font()
    assert font is None or font in style.CJK_FONTS
    if font:  # the characters of router.png's sentences are drawn, not spelled as U+XXXX
        assert all(style.can_draw(ch) for text in sys.modules["plots.runs"].SENTENCES.values() for ch in text)
