"""convert --pack-to / --tokens-per-step / --gate: packed sequences keep every example whole and
its target mask with it; accumulation equals one big batch; every gate variant converts."""

import json
from pathlib import Path

import pytest
import torch
from conftest import one_line_error
from test_convert import config as convert_config

from melt_bench.cli import main
from melt_bench.evaluation.byte_tokenizer import byte_tokenizer
from melt_bench.models import MeltForCausalLM, load_model
from melt_bench.training.convert import batch_for_step, load_texts, micro_batches, pack_rows, run_convert

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"


def config(out: Path, **overrides):
    return convert_config(out, **{"transition_steps": 1, "distill_steps": 1, **overrides})


def test_pack_rows_keeps_every_row_whole_once_and_in_order():
    rows = [([1] * p, [2] * t) for p, t in ((3, 2), (4, 4), (1, 1), (6, 3), (2, 2), (9, 1))]
    packed = pack_rows(rows, 12)
    assert [row for sequence in packed for row in sequence] == rows
    for sequence in packed:  # tokens plus one separator between neighbours fit
        assert sum(len(p) + len(t) for p, t in sequence) + len(sequence) - 1 <= 12
    # sizes 5, 8, 2, 9, 4, 10: 5+1+8 > 12 opens a new sequence, 8+1+2 fits, 9+1+4 and 4+1+10 do not
    assert [len(sequence) for sequence in packed] == [1, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_rows([([1] * 10, [2] * 3)], 12)


def test_a_packed_batch_learns_each_answer_and_nothing_else(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = ({"question": f"{a}+{a}", "answer": f"#### {2 * a}"} for a in range(10, 30))
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts, tok = load_texts(str(data)), byte_tokenizer()
    batch = batch_for_step(tok, texts, config(tmp_path, pack_to=128, batch_size=3), 0)
    assert batch.ids.shape == (3, 128)
    for row in range(3):
        text = tok.decode(batch.ids[row][batch.tokens[row]])
        eos = tok.decode([tok.eos_token_id])
        examples = text.split(eos)
        assert len(examples) >= 2  # several problems per sequence: a step crosses chunk boundaries
        for example in examples:
            question, answer = example.removeprefix("Question: ").split("\nAnswer:")
            a = int(question.split("+")[0])
            assert answer == f" #### {2 * a}\n"
        learned = tok.decode(batch.ids[row, 1:][batch.targets[row, :-1]])
        assert learned == "".join(example.split("\nAnswer:")[1] for example in examples)  # answers only, no EOS
        assert not batch.targets[row][~batch.tokens[row]].any()
    again = batch_for_step(tok, texts, config(tmp_path, pack_to=128, batch_size=3), 0)
    assert torch.equal(batch.ids, again.ids) and torch.equal(batch.targets, again.targets)


def test_micro_batches_reach_the_tokens_per_step():
    assert micro_batches(config(Path("x"))) == 1
    assert micro_batches(config(Path("x"), tokens_per_step=200)) == 3  # 2 rows x 40 tokens per micro-batch
    # the paper's step: 320,000 tokens of 10,000-token sequences, one per micro-batch
    assert micro_batches(config(Path("x"), pack_to=10_000, batch_size=1, tokens_per_step=320_000)) == 32


def test_accumulated_steps_train_and_log_their_tokens(tmp_path):
    final = run_convert(config(tmp_path, pack_to=64, tokens_per_step=256), progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(row["phase"], row["micro_batches"], row["tokens"]) for row in log] == [(1, 2, 256), (2, 2, 256)]
    assert load_model("melt-tiny", weights=final).config.chunk_size == 16


@pytest.mark.parametrize("gate", ["scalar", "mean", "ema", "last"])
def test_every_gate_variant_converts(gate, tmp_path):
    assert main(["convert", "--from", "ouro-tiny", "--out", str(tmp_path), "--data", str(DATA), "--device", "cpu",
                 "--no-progress", "--chunk-size", "16", "--transition-steps", "1", "--distill-steps", "1",
                 "--batch-size", "2", "--seq-len", "40", "--gate", gate]) == 0
    melt = load_model("melt-tiny", weights=tmp_path / "model")
    assert isinstance(melt, MeltForCausalLM) and melt.config.gate == gate


@pytest.mark.parametrize("args,needle", [
    (["--gate", "gru"], "--gate: 'gru' is not one of"),
    (["--pack-to", "1"], "--pack-to: 1 must be at least 2"),
    (["--tokens-per-step", "0"], "--tokens-per-step"),
    (["--pack-to", "64", "--decode-chunks"], "do not combine"),
])
def test_bad_packing_or_gate_arguments_are_one_line(args, needle, tmp_path, capsys):
    argv = ["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "o"), "--data", str(DATA), "--device", "cpu",
            "--no-progress", *args]
    err = one_line_error(argv, capsys)
    assert needle in err
