"""Accuracy through lm-eval: our adapter, local task data, rows, resume, bad input."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from melt_bench.cli import main
from melt_bench.evaluation.byte_tokenizer import byte_tokenizer
from melt_bench.evaluation.lm_eval_adapter import LoopedHFLM, exit_kwargs, local_task_dir
from melt_bench.models import load_model
from melt_bench.running.results import load_results
from melt_bench.scenarios import measure_accuracy as accuracy_module
from melt_bench.scenarios.accuracy import AccuracyPoint, check_tasks
from melt_bench.scenarios.measure_accuracy import evaluate_point, metric_rows

DATA = Path(__file__).parent / "data"
RUN = ["--limit", "2", "--num-fewshot", "1", "--max-gen-toks", "8", "--data-dir", str(DATA), "--device", "cpu",
       "--dtype", "float32"]


def test_exit_modes():
    assert exit_kwargs("last") == {} and exit_kwargs("expected") == {"use_weighted_exit": True}
    assert exit_kwargs("step:2") == {"exit_at_step": 1} and exit_kwargs("threshold:0.9") == {"exit_threshold": 0.9}
    for bad in ("step:0", "threshold:1.5", "sometimes", "step:x"):
        with pytest.raises(ValueError):
            exit_kwargs(bad)


def test_metric_rows_reads_lm_eval_results():
    results = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5,
                                     "exact_match_stderr,strict-match": 0.1, "exact_match,flexible-extract": 0.75,
                                     "exact_match_stderr,flexible-extract": "N/A"}},
               "n-samples": {"gsm8k": {"original": 1319, "effective": 4}}}
    assert sorted(metric_rows(results, "gsm8k")) == [
        ("exact_match", "flexible-extract", 0.75, None, 4), ("exact_match", "strict-match", 0.5, 0.1, 4)]


def test_local_task_dir(tmp_path):
    folder = local_task_dir(DATA, ["gsm8k"], tmp_path / "tasks")
    text = (folder / "gsm8k_local.yaml").read_text()
    assert "dataset_path: json" in text and str((DATA / "gsm8k" / "test.jsonl").resolve()) in text
    assert re.search(r"include: .*gsm8k\.yaml", text)
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        local_task_dir(tmp_path, ["gsm8k"], tmp_path / "other")


def test_accuracy_command_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "acc.jsonl"
    assert main(["accuracy", "--loops", "1,2", "--models", "ouro-tiny,melt-tiny", "--out", str(out), *RUN]) == 0
    frame = load_results(out)
    assert set(frame.status) == {"ok"} and set(frame.kind) == {"accuracy"}
    assert len(frame) == 2 * 2 * 2  # models x loops x (strict-match, flexible-extract)
    assert set(frame["filter"]) == {"strict-match", "flexible-extract"} and set(frame.metric) == {"exact_match"}
    assert (frame.n_samples == 2).all() and frame.stderr.notna().all() and (frame.peak_bytes >= 0).all()
    kv = frame.groupby(["model", "loops"]).kv_bytes_per_token.first()  # measured from a real cache
    assert kv["ouro-tiny", 2] == 2 * kv["ouro-tiny", 1]
    assert kv["melt-tiny", 2] == kv["melt-tiny", 1] == kv["ouro-tiny", 1]
    assert set(frame.weights_source) == {"random"} and (frame.num_fewshot_used == 1).all()
    assert set(frame[frame.model == "melt-tiny"].melt_gate) == {"random"}
    # the raw generations differ between models and loops, though every filtered answer is "[invalid]"
    assert frame.groupby(["model", "loops"]).responses_sha256.first().nunique() == 4
    assert main(["accuracy", "--loops", "1,2", "--models", "ouro-tiny,melt-tiny", "--out", str(out), "--resume",
                 *RUN]) == 0
    assert "0 runs, 4 already recorded" in capsys.readouterr().out
    assert len(load_results(out)) == 8


def answer_lookup() -> dict[str, str]:
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    return {row["question"]: row["answer"].split("####")[-1].strip() for row in rows}


def test_exact_match_equals_the_fraction_answered_right(tmp_path, monkeypatch):
    """The whole path (prompt in, generation out, lm-eval's filters) with a model whose generate()
    answers 3 of the first 4 test questions right and the other one wrong; and loops reach it."""
    answers, seen_loops = answer_lookup(), []
    wrong = list(answers)[1]  # the second document gets a wrong number
    tokenizer = byte_tokenizer()

    def oracle_load_model(name, weights=None, dtype=None, device=None, **settings):
        model = load_model(name, weights, dtype=dtype, device=device, **settings)

        def generate(input_ids=None, attention_mask=None, loops=None, **kwargs):
            seen_loops.append(loops)
            assert attention_mask is not None and attention_mask.shape == input_ids.shape
            outputs = []
            for row in input_ids:
                prompt = tokenizer.decode(row[row != tokenizer.pad_token_id])
                question = prompt.rsplit("Question: ", 1)[-1].rsplit("\nAnswer:", 1)[0]
                answer = "-12345" if question == wrong else answers[question]
                reply = tokenizer(f" So #### {answer}\n\nQuestion:").input_ids
                outputs.append(torch.cat([row, torch.tensor(reply)]))
            width = max(len(o) for o in outputs)
            return torch.stack([torch.nn.functional.pad(o, (0, width - len(o))) for o in outputs])

        model.generate = generate
        return model

    monkeypatch.setattr(accuracy_module, "load_model", oracle_load_model)
    task_manager = check_tasks(["gsm8k"], str(DATA), tmp_path / "tasks")
    rows = []
    for loops in (1, 3):  # what each point's child runs, here in this process to reach the oracle
        point = AccuracyPoint("ouro-tiny", loops, "gsm8k", num_fewshot=1, limit=4, batch_size=2, dtype="float32",
                              data_dir=str(DATA), generate_with="generate")  # the oracle replaces generate()
        rows += evaluate_point(point, task_manager, None, {}, tmp_path / "lm-eval.log")[0]
    scores = {(r.point["filter"], r.metrics["value"]) for r in rows}
    assert scores == {("strict-match", 0.75), ("flexible-extract", 0.75)}
    assert set(seen_loops) == {1, 3}
    # each row keeps its per-document scores (lm-eval's per-sample log), for paired verdicts
    for r in rows:
        assert r.metrics["document_scores"] == [[0, 1.0], [1, 0.0], [2, 1.0], [3, 1.0]]


def test_batched_generation_matches_batch_of_one():
    from lm_eval.api.instance import Instance

    torch.manual_seed(0)
    model, tokenizer = load_model("ouro-tiny"), byte_tokenizer()
    prompts = ["Question: 1+1?\nAnswer:", "Question: what is the capital of France, in one word?\nAnswer:",
               "Q: x\nA:"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 6}), i)
                for i, p in enumerate(prompts)]
    one = LoopedHFLM(model, tokenizer, loops=3, batch_size=1, max_length=512).generate_until(requests)
    three = LoopedHFLM(model, tokenizer, loops=3, batch_size=3, max_length=512).generate_until(requests)
    assert one == three and all(isinstance(text, str) for text in one)


def test_malformed_data_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    err = one_line_error(["accuracy", "--loops", "1", "--data-dir", str(tmp_path), "--device", "cpu", "--models",
                          "ouro-tiny", "--out", str(tmp_path / "a.jsonl")], capsys)
    assert "test.jsonl:2: missing field(s) answer" in err
    (tmp_path / "gsm8k" / "test.jsonl").write_text("not json\n")
    assert main(["accuracy", "--loops", "1", "--data-dir", str(tmp_path), "--device", "cpu", "--models", "ouro-tiny",
                 "--out", str(tmp_path / "b.jsonl")]) == 2
    assert "test.jsonl:1: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


ON_CPU = ["--device", "cpu", "--models", "ouro-tiny"]


@pytest.mark.parametrize("args,needle", [(["--tasks", "no_such_task", *ON_CPU], "no_such_task"),
                                         (["--data-dir", "/no/such/dir", *ON_CPU], "--data-dir"),
                                         (["--exit-mode", "sometimes", *ON_CPU], "--exit-mode"),
                                         (["--loops", "3..1", *ON_CPU], "--loops"),
                                         (["--limit", "0", *ON_CPU], "--limit"),
                                         # the sweeps' placement options, now accuracy's too
                                         (["--gpus", "0", *RUN, "--models", "ouro-tiny"], "--gpus runs CUDA points"),
                                         (["--executor", "slurm", *RUN, "--models", "ouro-tiny"], "--executor"),
                                         (["--retry-failed", *RUN, "--models", "ouro-tiny"], "needs --resume"),
                                         (["--point-timeout", "0", *RUN, "--models", "ouro-tiny"], "--point-timeout")])
def test_accuracy_bad_input(args, needle, capsys):
    err = one_line_error(["accuracy", *args], capsys)
    assert needle in err


def test_official_exit_mode_records_the_fraction_of_tokens_that_exited_early(tmp_path, monkeypatch):
    def saturated_gate(name, weights=None, dtype=None, device=None, **settings):
        model = load_model(name, weights, dtype=dtype, device=device, **settings)
        with torch.no_grad():
            model.model.early_exit_gate.bias.fill_(30.0)  # sigmoid is exactly 1.0: exit at loop 1
        return model

    monkeypatch.setattr(accuracy_module, "load_model", saturated_gate)
    task_manager = check_tasks(["gsm8k"], str(DATA), tmp_path / "tasks")
    fractions = {}
    for mode in ("official", "last"):
        point = AccuracyPoint("ouro-tiny", 3, "gsm8k", exit_mode=mode, num_fewshot=0, limit=2, max_gen_toks=3,
                              dtype="float32", data_dir=str(DATA), kv_policy="last-loop")
        rows, _ = evaluate_point(point, task_manager, None, {}, tmp_path / "lm-eval.log")
        assert rows and all(row.status == "ok" for row in rows)
        fractions[mode] = rows[0].metrics["exited_early_fraction"]
        assert rows[0].metrics["kv_policy"] == "last-loop"
    assert fractions == {"official": 1.0, "last": None}
