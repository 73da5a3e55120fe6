"""melt-bench convert: the two-phase training loop, checkpoints, resume, bad arguments."""

import json
from pathlib import Path

import pytest
import torch

from melt_bench.cli import main
from melt_bench.convert import ConvertConfig, batch_for_step, load_texts, run_convert
from melt_bench.models import MeltForCausalLM, load_model

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"


def config(out: Path, **overrides) -> ConvertConfig:
    fields = dict(source="ouro-tiny", out=str(out), data=str(DATA), chunk_size=16, transition_steps=2,
                  distill_steps=2, lr_base=1e-4, lr_gate=1e-2, batch_size=2, seq_len=40, checkpoint_every=1)
    return ConvertConfig(**{**fields, **overrides})


def test_texts_and_deterministic_batches():
    texts = load_texts(str(DATA))
    assert len(texts) == 10 and texts[0].startswith("Question: ")
    from melt_bench.byte_tokenizer import byte_tokenizer

    cfg, tok = config(Path("unused")), byte_tokenizer()
    assert torch.equal(batch_for_step(tok, texts, cfg, 3), batch_for_step(tok, texts, cfg, 3))
    assert batch_for_step(tok, texts, cfg, 3).shape[1] <= 40


def test_two_phases_end_to_end(tmp_path):
    final = run_convert(config(tmp_path), progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in log] == [1, 1, 2, 2] and [row["alpha"] for row in log[:2]] == [0.0, 1.0]
    assert all(row["loss"] > 0 for row in log) and "kd" in log[2] and "attention_mse" in log[2]
    melt = load_model("melt-tiny", weights=final)
    assert isinstance(melt, MeltForCausalLM) and melt.config.chunk_size == 16
    fresh = MeltForCausalLM.from_ouro(load_model("ouro-tiny"), chunk_size=16)
    trained_gate = melt.model.layers[0].self_attn.kv_gate.w_z.weight
    assert not torch.equal(trained_gate, fresh.model.layers[0].self_attn.kv_gate.w_z.weight)


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    whole = run_convert(config(tmp_path / "whole"), progress=False)
    run_convert(config(tmp_path / "split"), stop_after=3, progress=False)  # stopped after its step-3 checkpoint
    resumed = run_convert(config(tmp_path / "split"), resume=True, progress=False)
    a, b = load_model("melt-tiny", weights=whole).state_dict(), load_model("melt-tiny", weights=resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "split" / "train_log.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("args,needle", [
    (["--transition-steps", "-1"], "--transition-steps"),
    (["--data", "/no/such/file.jsonl"], "--data"),
    (["--from", "melt-tiny"], "not an Ouro model"),
    (["--from", "ouro-99b"], "unknown model"),
    (["--chunk-size", "0"], "--chunk-size"),
])
def test_bad_arguments(tmp_path, capsys, args, needle):
    base = {"--from": "ouro-tiny", "--out": str(tmp_path / "o"), "--data": str(DATA)}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    argv = ["convert", *[x for kv in base.items() for x in kv], "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_existing_checkpoint_needs_resume_and_bad_data_is_one_line(tmp_path, capsys):
    run_convert(config(tmp_path / "o", transition_steps=1, distill_steps=0), progress=False)
    argv = ["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "o"), "--data", str(DATA), "--device", "cpu"]
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    argv = ["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "p"), "--data", str(bad), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 2 and "bad.jsonl:1: needs a 'text' field" in capsys.readouterr().err
