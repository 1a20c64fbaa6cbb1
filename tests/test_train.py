"""train.py: the recipe's pieces, overfitting a tiny corpus, exact resume, the log."""

import codecs
import json
import math
import os
import this

import pytest
import torch

import nano_orion
import train
from nano_orion import Orion, OrionConfig, atomic
from nano_orion.moe import load_balancing_loss

from conftest import FIXTURES, assert_same_weights, load_script

generate_cli = load_script("generate.py")
TOKENIZER = FIXTURES / "orion-mini-rmsnorm" / "tokenizer.model"  # a real one: load() and generate.py read it

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, n_experts=4, top_k=2, max_seq_len=64)


def tiny_run(tmp_path, corpus, out, *extra):
    """Command line for a tiny model (TINY, 320-piece vocabulary) on `corpus`, logging every step."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    return ["--config", str(config), "--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--out-dir", str(out),
            "--vocab-size", "320", "--batch-size", "8", "--block-size", "32", "--log-interval", "1",
            "--eval-iters", "2", "--device", "cpu", *extra]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine extra threads only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The Zen of Python, repeated to the 32 kB a 320-piece tokenizer needs: easy to memorise."""
    zen = codecs.decode(this.s, "rot13")
    path = tmp_path_factory.mktemp("corpus") / "zen.txt"
    path.write_text((zen + "\n\n") * 40)
    return path


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_peak_cosine_floor():
    lr, warmup, decay = 1e-3, 10, 111  # steps 0..110
    assert train.lr_at(0, lr, warmup, decay) == pytest.approx(1e-4)  # 1/10 of the way up
    assert train.lr_at(4, lr, warmup, decay) == pytest.approx(5e-4)
    assert train.lr_at(9, lr, warmup, decay) == pytest.approx(1e-3)  # peak reached at the end of warm-up
    assert train.lr_at(10, lr, warmup, decay) == pytest.approx(1e-3)  # cosine starts at the peak
    assert train.lr_at(60, lr, warmup, decay) == pytest.approx(0.55e-3)  # half way: (1 + 0.1) / 2
    assert train.lr_at(35, lr, warmup, decay) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert train.lr_at(110, lr, warmup, decay) == pytest.approx(1e-4)  # 10% of the peak at the last step
    assert train.lr_at(500, lr, warmup, decay) == pytest.approx(1e-4)  # and flat after it


def test_weight_decay_on_matrices_and_stacked_experts_only():
    model = Orion(OrionConfig.preset("toy", **TINY))
    decay, no_decay = train.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    expected = {"embed.weight", "lm_head.weight"} | {
        f"layers.{i}.{w}" for i in range(2)
        for w in ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
                  "moe.router.weight", "moe.w1", "moe.w2", "moe.w3")}
    assert names == expected
    no_decay_names = {n for n, p in model.named_parameters() if id(p) not in ids}
    assert no_decay_names and all("norm" in n for n in no_decay_names)


def test_aux_loss_reaches_the_router_only():
    torch.manual_seed(0)
    model = Orion(OrionConfig.preset("toy", **TINY, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    ce, aux, counts = train.losses(model, model, x, x)
    aux.backward()
    for layer in model.layers:
        assert layer.moe.router.weight.grad.abs().sum() > 0  # the aux loss's gradient reaches every router
    # ... and only what feeds a router: not the last layer's experts, not the head
    assert model.layers[-1].moe.w1.grad is None and model.lm_head.weight.grad is None
    # counts: routed slots per expert, each layer's row sums to tokens x top_k
    assert counts.shape == (2, 4) and counts.sum(-1).tolist() == [2 * 16 * 2] * 2
    # the mean of the layers' load-balancing losses
    model(x)
    routers = model.routing()
    assert aux.item() == pytest.approx(sum(load_balancing_loss(p, e).item() for p, e in routers) / 2)


def test_tiny_model_overfits_tiny_corpus_and_logs(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    train.main(tiny_run(tmp_path, corpus, out, "--max-iters", "120", "--eval-interval", "60", "--lr", "1e-2",
                        "--warmup-iters", "10"))
    log = read_log(out)
    steps = [r for r in log if r["kind"] == "train"]
    evals = [r for r in log if r["kind"] == "eval"]
    saves = [r for r in log if r["kind"] == "save"]
    assert [r["step"] for r in steps] == list(range(1, 121))
    assert [r["step"] for r in evals] == [60, 120]
    assert [(r["step"], r["folder"]) for r in saves] == [(60, str(out)), (120, str(out))]
    said = capsys.readouterr().out  # tqdm.write's lines, above the bar
    for r in saves:
        assert r["seconds"] > 0 and f"step {r['step']}: saved the checkpoint to {out} in {r['seconds']:.1f} s" in said
    assert steps[0]["loss"] > 5.0  # starts near ln(vocab) ~ ln(320) = 5.8
    assert steps[-1]["loss"] < 1.0 and evals[-1]["val_loss"] < 1.0  # memorised (val is more of the same text)
    assert steps[-1]["tokens"] == 120 * 8 * 32
    for r in steps:
        assert set(r) == {"kind", "step", "tokens", "loss", "aux_loss", "lr", "tokens_per_s", "mfu", "expert_load"}
        # about top_k = 2, its value at an even load; not a lower bound: within one batch the
        # routed shares and the mean router probabilities need not line up
        assert 1.9 < r["aux_loss"] < 3
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # a CPU has no known peak, and none was given
        assert len(r["expert_load"]) == 2 and all(len(row) == 4 and abs(sum(row) - 1) < 1e-5 for row in r["expert_load"])
    assert steps[-1]["lr"] == pytest.approx(1e-3)  # the cosine ends at 10% of --lr
    assert "MFU n/a: no known peak for cpu; pass --peak-tflops" in said


def test_resume_continues_exactly(tmp_path, corpus):
    common = ["--max-iters", "6", "--eval-interval", "3", "--warmup-iters", "2", "--peak-tflops", "0.1"]
    whole = tmp_path / "whole"
    train.main(tiny_run(tmp_path, corpus, whole, *common))
    # Same run, stopped after step 3 (the schedule still ends at 6), then resumed.
    split = tmp_path / "split"
    train.main(tiny_run(tmp_path, corpus, split, *common[2:], "--max-iters", "3", "--lr-decay-iters", "6"))
    # --resume takes the run's settings from the checkpoint: only the longer --max-iters is given
    model = train.main(["--resume", "--out-dir", str(split), "--max-iters", "6", "--device", "cpu", "--peak-tflops", "0.1"])

    def without_timing(log):  # nor the folder, which differs
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "seconds", "folder")} for r in log]

    assert len(read_log(whole)) == 6 + 2 + 2  # train, eval and save lines
    assert without_timing(read_log(split)) == without_timing(read_log(whole))  # losses, aux, load, lr: bit for bit
    reference, _ = nano_orion.load(whole)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path / "missing.txt"), "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path)])
    assert "missing.txt: no such file or folder" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_run(tmp_path, corpus, tmp_path / "nothing", "--resume"))
    assert "no checkpoint" in capsys.readouterr().err


def save_at(out, model, step):
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.1))
    train.save_checkpoint(out, model, optimizer, TOKENIZER, {"step": step, "tokens": 0}, rank=0)


def load_at(out, model, optimizer) -> int:
    """--resume's reading of OUT_DIR into model and optimizer -> the step it saved."""
    state = train.read_train_state(out)
    train.load_checkpoint(out, state, model, optimizer)
    return state["step"]


def assert_readers_see(out, model, step):
    """nano_orion.load(), generate.py and --resume read `model`'s weights (and --resume its step)."""
    loaded, tokenizer = nano_orion.load(out)
    assert tokenizer is not None
    assert_same_weights(loaded, model)
    parser, args = generate_cli.parse_args(["--ckpt", str(out), "--device", "cpu"])
    assert torch.equal(generate_cli.load(parser, args)[0].lm_head.weight, model.lm_head.weight)
    fresh = Orion(model.config)
    assert load_at(out, fresh, torch.optim.AdamW(train.param_groups(fresh, 0.1))) == step
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_a_save_swaps_whole_checkpoints_and_keeps_the_log(tmp_path, monkeypatch):
    """Up to the instant a save swaps its folder in, every reader finds the previous checkpoint,
    whole, and from then on the new one; killed while writing, the save leaves the previous one
    and nothing else. The log and the lock file move into the new folder as the same files.
    (KeyboardInterrupt stands in for a SIGKILL: nothing catches it on the way out.)"""
    torch.manual_seed(0)
    config = OrionConfig.preset("toy", **TINY, vocab_size=64)
    first, second = Orion(config), Orion(config)
    out = tmp_path / "out"
    save_at(out, first, 1)
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / train.LOCK).touch()
    log_inode = (out / "log.jsonl").stat().st_ino

    def killed_while_writing(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # the second save, killed while writing train_state.pt
        m.setattr(torch, "save", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            save_at(out, second, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    assert_readers_see(out, first, 1)

    exchange, swapped = atomic._exchange, []

    def watched_exchange(new, target):
        assert_readers_see(target, first, 1)  # the last instant before the swap: the previous checkpoint
        swapped.append(exchange(new, target))
        return swapped[-1]

    monkeypatch.setattr(atomic, "_exchange", watched_exchange)
    save_at(out, second, 2)
    assert swapped == [True]  # one system call on Linux: the folder was never missing
    assert_readers_see(out, second, 2)
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n' and (out / "log.jsonl").stat().st_ino == log_inode
    assert sorted(p.name for p in out.iterdir()) == [train.LOCK, "config.json", "log.jsonl", "model.safetensors",
                                                     "tokenizer.model", "tokenizer_config.json", "train_state.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_resume_reads_sharded_checkpoints(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = OrionConfig.preset("toy", **TINY, vocab_size=64)
    model = Orion(config)
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.1))
    train.losses(model, model, torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))[0].backward()
    optimizer.step()
    (tmp_path / "tok.model").write_bytes(b"any")
    monkeypatch.setattr(train, "MAX_SHARD_BYTES", 100_000)  # what a model over 5 GB gets: shards + index
    train.save_checkpoint(tmp_path, model, optimizer, tmp_path / "tok.model", {"step": 7, "tokens": 0}, rank=0)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    fresh = Orion(config)
    fresh_optimizer = torch.optim.AdamW(train.param_groups(fresh, 0.1))
    assert load_at(tmp_path, fresh, fresh_optimizer) == 7
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    moments = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    assert len(moments) == len(list(model.parameters())) and all(m.abs().sum() > 0 for m in moments)


def test_a_plain_save_over_a_training_checkpoint_drops_its_optimizer_state(tmp_path):
    """train_state.pt belongs to the weights saved with it: nano_orion.save writing other weights
    into the folder removes it, so --resume cannot pair them with the old optimizer state."""
    model = Orion(OrionConfig.preset("toy", **TINY, vocab_size=64))
    save_at(tmp_path, model, 3)
    assert (tmp_path / "train_state.pt").exists()
    nano_orion.save(model, tmp_path)
    assert not (tmp_path / "train_state.pt").exists() and (tmp_path / "tokenizer.model").exists()


def test_a_new_checkpoint_leaves_no_stale_shards(tmp_path):
    """A sharded save followed by a single-file one: the old index must not outlive its shards."""
    torch.manual_seed(0)
    config = OrionConfig.preset("toy", **TINY, vocab_size=64)
    model = Orion(config)
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.1))
    (tmp_path / "tok.model").write_bytes(b"any")
    nano_orion.save(model, tmp_path, max_shard_bytes=100_000)  # an earlier, sharded save
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    train.save_checkpoint(tmp_path, model, optimizer, tmp_path / "tok.model", {"step": 1, "tokens": 0}, rank=0)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    loaded = nano_orion.checkpoint.load_nano(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_resume_drops_a_half_written_log_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (1, 2, 3)]
    log.write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')  # killed mid-write
    train.truncate_log(log, 2)
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"


def test_gpu_peak_flops_by_whole_name():
    assert train.spec_peak_flops("NVIDIA L4") == 121e12
    assert train.spec_peak_flops("NVIDIA L40S") == 362e12  # not the L4's
    assert train.spec_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert train.spec_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train.spec_peak_flops("NVIDIA A10G") is None  # not the A10's: no MFU without --peak-tflops


def test_fsdp_without_torchrun_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        train.main(["--fsdp"])
    err = capsys.readouterr().err
    assert "--fsdp shards across processes" in err and "torchrun" in err
