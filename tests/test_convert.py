"""melt-bench convert: the two-phase training loop, checkpoints, resume, bad arguments."""

import json
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from melt_bench.cli import main
from melt_bench.models import MeltForCausalLM, load_model
from melt_bench.training.convert import ConvertConfig, batch_for_step, load_texts, run_convert

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"


def config(out: Path, **overrides) -> ConvertConfig:
    fields = dict(source="ouro-tiny", out=str(out), data=str(DATA), chunk_size=16, transition_steps=2,
                  distill_steps=2, lr_base=1e-4, lr_gate=1e-2, batch_size=2, seq_len=40, checkpoint_every=1)
    return ConvertConfig(**{**fields, **overrides})


def test_texts_and_deterministic_batches():
    texts = load_texts(str(DATA))
    assert len(texts) == 10 and texts[0].prompt.startswith("Question: ") and texts[0].prompt.endswith("\nAnswer:")
    assert texts[0].target.startswith(" ") and "####" in texts[0].target
    from melt_bench.evaluation.byte_tokenizer import byte_tokenizer

    cfg, tok = config(Path("unused"), seq_len=400), byte_tokenizer()
    a, b = batch_for_step(tok, texts, cfg, 3), batch_for_step(tok, texts, cfg, 3)
    assert all(torch.equal(x, y) for x, y in zip((a.ids, a.tokens, a.targets), (b.ids, b.tokens, b.targets)))
    assert batch_for_step(tok, texts, config(Path("unused")), 3).ids.shape[1] <= 40


def test_batches_learn_the_answer_and_never_the_padding(tmp_path):
    from melt_bench.evaluation.byte_tokenizer import byte_tokenizer

    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "1+1", "answer": "#### 2"}\n{"text": "abcdefghij"}\n')
    texts, tok = load_texts(str(data)), byte_tokenizer()
    batch = batch_for_step(tok, texts, config(tmp_path, data=str(data), batch_size=6, seq_len=64), 0)
    for row in range(6):
        ids = batch.ids[row][batch.tokens[row]].tolist()
        learned = tok.decode(batch.ids[row, 1:][batch.targets[row, :-1]])  # the tokens the model must predict
        if tok.decode(ids).startswith("Question"):
            assert tok.decode(ids) == "Question: 1+1\nAnswer: #### 2\n" and learned == " #### 2\n"
        else:
            assert tok.decode(ids) == "abcdefghij" and learned == "bcdefghij"
        assert not batch.targets[row][~batch.tokens[row]].any()
    assert {tok.decode(batch.ids[r][batch.tokens[r]])[0] for r in range(6)} == {"Q", "a"}
    short = batch_for_step(tok, texts[:1], config(tmp_path, data=str(data), batch_size=1, seq_len=10), 0)
    assert tok.decode(short.ids[0]) == "r: #### 2\n"  # the prompt's start goes first, the answer stays


def test_two_phases_end_to_end(tmp_path):
    final = run_convert(config(tmp_path), progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in log] == [1, 1, 2, 2] and [row["alpha"] for row in log[:2]] == [0.0, 1.0]
    assert all(row["loss"] > 0 and row["step_s"] > 0 for row in log) and "kd" in log[2] and "attention_mse" in log[2]
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


def test_a_checkpoint_with_the_optimiser_keyed_by_index_still_resumes(tmp_path):
    """Checkpoints written before the layout-free form held optimizer.state_dict() (parameters
    numbered over the param groups in order): renamed on load, they resume as before."""
    whole = run_convert(config(tmp_path / "whole"), progress=False)
    run_convert(config(tmp_path / "old"), stop_after=3, progress=False)
    path = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    names = [name for group in state["optimizer"]["param_groups"] for name in group["params"]]
    number, first = {name: i for i, name in enumerate(names)}, 0
    state["optimizer"] = {"state": {number[name]: value for name, value in state["optimizer"]["state"].items()},
                          "param_groups": []}
    for group in torch.load(path, weights_only=False)["optimizer"]["param_groups"]:
        state["optimizer"]["param_groups"].append({**group, "params": list(range(first, first + len(group["params"])))})
        first += len(group["params"])
    del state["micro_batches"]
    torch.save(state, path)
    resumed = run_convert(config(tmp_path / "old"), resume=True, progress=False)
    a, b = load_model("melt-tiny", weights=whole).state_dict(), load_model("melt-tiny", weights=resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,needle", [
    (["--transition-steps", "-1"], "--transition-steps"),
    (["--data", "/no/such/file.jsonl"], "--data"),
    (["--from", "melt-tiny"], "not an Ouro model"),
    (["--from", "ouro-99b"], "unknown model"),
    (["--chunk-size", "0"], "--chunk-size"),
    (["--stop-after", "0"], "--stop-after"),
])
def test_bad_arguments(tmp_path, capsys, args, needle):
    base = {"--from": "ouro-tiny", "--out": str(tmp_path / "o"), "--data": str(DATA)}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    argv = ["convert", *[x for kv in base.items() for x in kv], "--device", "cpu", "--no-progress"]
    err = one_line_error(argv, capsys)
    assert needle in err


@pytest.mark.parametrize("flags,needle", [
    (["--fsdp"], "--fsdp shards over data-parallel ranks: launch with accelerate launch or torchrun"),
    (["--fsdp-reshard-after-forward"], "--fsdp-reshard-after-forward needs --fsdp"),
])
def test_sharding_flags_out_of_place_are_one_line(tmp_path, capsys, monkeypatch, flags, needle):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    argv = ["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "o"), "--data", str(DATA), "--device", "cpu",
            "--no-progress", *flags]
    err = one_line_error(argv, capsys)
    assert needle in err and not (tmp_path / "o").exists()


def test_existing_checkpoint_needs_resume_and_bad_data_is_one_line(tmp_path, capsys):
    run_convert(config(tmp_path / "o", transition_steps=1, distill_steps=0), progress=False)
    argv = ["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "o"), "--data", str(DATA), "--device", "cpu"]
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    argv = ["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "p"), "--data", str(bad), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 2 and "bad.jsonl:1: needs a 'text' field" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [8, 32])
def test_decode_chunks_train_targets_exactly_as_melt_generates_them(tmp_path, chunk):
    """With --decode-chunks the training forward computes, for every target token, what
    prefill-then-decode computes at inference (for a left-padded row when its prompt fits in one
    prefill chunk: chunk 32 here; with chunk 8 the pads shift the prefill split)."""
    from melt_bench.evaluation.byte_tokenizer import byte_tokenizer

    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "12+34", "answer": "#### 46"}\n{"question": "1+1", "answer": "#### 2"}\n')
    cfg = config(tmp_path, data=str(data), batch_size=4, seq_len=64, chunk_size=chunk, decode_chunks=True)
    batch = batch_for_step(byte_tokenizer(), load_texts(str(data)), cfg, 0)
    lead = int(batch.targets.float().argmax(dim=1).max()) + 1  # the common first target column
    assert batch.targets.float().argmax(dim=1).eq(lead - 1).all()  # every row's targets start there
    assert batch.chunk_starts == [*range(0, lead, chunk), *range(lead, batch.ids.shape[1])]
    assert batch.left_padded and not batch.tokens.all()
    melt = MeltForCausalLM.from_ouro(load_model("ouro-tiny"), chunk_size=chunk).eval()
    with torch.no_grad():
        trained = melt(batch.ids, use_cache=False, **batch.forward_kwargs()).logits
        for row in range(batch.ids.shape[0]):
            real = batch.tokens[row]
            ids, start = batch.ids[row][real][None], int(real.float().argmax())
            if start > 0 and chunk < lead:
                continue
            cache = melt.new_cache()
            steps = [melt(ids[:, : lead - start], past_key_values=cache).logits]  # prefill the prompt
            steps += [melt(ids[:, j : j + 1], past_key_values=cache).logits for j in range(lead - start, ids.shape[1])]
            generated = torch.cat(steps, dim=1)
            torch.testing.assert_close(trained[row][real][lead - start - 1 :], generated[0, lead - start - 1 :],
                                       rtol=1e-4, atol=1e-5)


def test_resume_with_other_settings_is_refused_and_oom_is_one_line(tmp_path, capsys, monkeypatch):
    run_convert(config(tmp_path / "o", transition_steps=1, distill_steps=1, checkpoint_every=1), stop_after=1,
                progress=False)
    before = (tmp_path / "o" / "checkpoint.pt").read_bytes()
    argv = ["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "o"), "--data", str(DATA), "--device", "cpu",
            "--no-progress", "--resume", "--chunk-size", "16", "--transition-steps", "1", "--distill-steps", "1",
            "--lr-base", "1e-4", "--lr-gate", "1e-2", "--batch-size", "2", "--seq-len", "40"]
    err = one_line_error([*argv, "--lr-gate", "5e-3", "--gradient-checkpointing"], capsys)
    assert "lr_gate=0.01 -> 0.005" in err and "gradient_checkpointing" not in err
    assert (tmp_path / "o" / "checkpoint.pt").read_bytes() == before

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.\nmore text")

    monkeypatch.setattr("melt_bench.training.convert.run_convert", out_of_memory)
    err = one_line_error([*argv, "--gradient-checkpointing"], capsys)
    assert "ran out of memory" in err and "checkpoint in" in err and "intact" in err
    assert "add --gradient-checkpointing" not in err[0]


def test_killed_process_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real `melt-bench convert` process once it has checkpointed, resume it, and get
    the parameters (and the log's steps) of a run that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    args = ["--from", "ouro-tiny", "--data", str(DATA), "--device", "cpu", "--no-progress", "--chunk-size", "16",
            "--transition-steps", "20", "--distill-steps", "20", "--lr-base", "1e-4", "--lr-gate", "1e-2",
            "--batch-size", "2", "--seq-len", "40", "--checkpoint-every", "3"]
    command = [sys.executable, "-m", "melt_bench", "convert"]
    killed = tmp_path / "killed"
    child = subprocess.Popen([*command, "--out", str(killed), *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model").exists()
    assert subprocess.run([*command, "--out", str(killed), *args, "--resume"], capture_output=True).returncode == 0
    whole = run_convert(config(tmp_path / "whole", transition_steps=20, distill_steps=20, checkpoint_every=3),
                        progress=False)
    a = load_model("melt-tiny", weights=whole).state_dict()
    b = load_model("melt-tiny", weights=killed / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
