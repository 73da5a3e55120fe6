"""Scores that mean nothing, said plainly (#32 item 6): rows say where their weights came from,
the report leads with random weights and draws no verdict from them, the accuracy table shows
the few-shot count lm-eval ran, and the responses hash covers the raw generations."""

from test_pareto import row

from melt_bench.models import load_model
from melt_bench.reporting.headlines import headlines
from melt_bench.reporting.report import build_report, load_frame
from melt_bench.running.results import ResultsStore
from melt_bench.scenarios.measure_accuracy import fewshot_used, responses_hash
from melt_bench.scenarios.point_setup import weights_origin


def test_weights_origin_names_random_local_and_a_fresh_gate(tmp_path):
    random_melt = load_model("melt-tiny")
    assert weights_origin("melt-tiny", None, random_melt) == {
        "weights_source": "random", "weights_from": "preset melt-tiny, torch.manual_seed(0)",
        "weights_revision": None, "melt_gate": "random"}
    load_model("ouro-tiny").save_pretrained(tmp_path / "ouro")
    melt_on_ouro = load_model("melt-tiny", tmp_path / "ouro")
    origin = weights_origin("melt-tiny", str(tmp_path / "ouro"), melt_on_ouro)
    assert origin["weights_source"] == "local" and origin["weights_from"] == str((tmp_path / "ouro").resolve())
    assert origin["melt_gate"] == "fresh"  # Ouro's weights under a new gate: not a converted MELT
    melt_on_ouro.save_pretrained(tmp_path / "melt")
    assert weights_origin("melt-tiny", str(tmp_path / "melt"), random_melt)["melt_gate"] == "checkpoint"
    assert "melt_gate" not in weights_origin("ouro-tiny", str(tmp_path / "ouro"), load_model("ouro-tiny"))
    assert weights_origin("ouro-tiny", "ByteDance/Ouro-1.4B", load_model("ouro-tiny"))["weights_source"] == "hub"


def test_the_responses_hash_covers_raw_generations_not_the_filtered_answers():
    def results(replies):
        samples = [{"doc_id": doc, "filter": name, "resps": [[reply]], "filtered_resps": ["[invalid]"]}
                   for doc, reply in enumerate(replies) for name in ("strict-match", "flexible-extract")]
        return {"samples": {"gsm8k": samples}}
    one, other = results(["blah", "blah"]), results(["blah", "bleh"])
    assert responses_hash(one, "gsm8k") != responses_hash(other, "gsm8k")  # filtered alike, raw not
    assert responses_hash(one, "gsm8k") == responses_hash(results(["blah", "blah"]), "gsm8k")
    padded = results(["blah", "blah"])  # two ranks: the padding request's copy joins the last document's
    for sample in padded["samples"]["gsm8k"][2:]:
        sample["resps"] = [["blah", "blah"]]
    assert responses_hash(padded, "gsm8k") == responses_hash(one, "gsm8k")
    assert fewshot_used({"n-shot": {"gsm8k": 5}}, "gsm8k") == 5 and fewshot_used({}, "gsm8k") is None


def random_weight_rows() -> list:
    """What a run on the tiny presets gives: every score 0, no weights given."""
    rows = [row("ouro-tiny", loops, 0.0, 2048 * loops) for loops in (1, 2)]
    rows += [row("ouro-tiny", 2, 0.0, 2048, "last-loop"), row("melt-tiny", 2, 0.0, 2048)]
    for result in rows:
        result.metrics.update(weights_source="random", num_fewshot_used=5)
    rows[-1].metrics["melt_gate"] = "random"
    return rows


def test_random_weights_get_no_verdict_and_the_first_screen_says_why(tmp_path):
    store = ResultsStore(tmp_path / "acc.jsonl")
    for result in random_weight_rows():
        store.append(result)
    lines = headlines(load_frame([store.path]))
    assert lines[0].startswith("Accuracy scores of ouro-tiny, melt-tiny come from random weights")
    assert "no verdict is drawn" in lines[0] and not any("At equal KV memory" in line for line in lines)
    html = build_report([store.path])
    assert "it matches it" not in html and "trained" not in html
    assert "few-shot" in html and ">5<" in html and "random (preset)" in html


def test_rows_from_before_provenance_was_recorded_count_as_random_without_weights(tmp_path):
    store = ResultsStore(tmp_path / "acc.jsonl")
    for result in (row("ouro-tiny", 2, 0.9, 2048, "last-loop"), row("melt-tiny", 2, 1.0, 2048),
                   row("ouro-tiny", 2, 0.9, 2048, "last-loop", "/w/teacher"),
                   row("melt-tiny", 2, 1.0, 2048, None, "/w/melt")):
        store.append(result)
    lines = headlines(load_frame([store.path]))
    assert lines[0].startswith("Accuracy scores of ouro-tiny, melt-tiny come from random weights")
    [verdict] = [line for line in lines if "At equal KV memory" in line]
    assert verdict.split(": ", 1)[1].startswith("melt-tiny @ w/melt at 2 loops")  # the checkpoint's only
