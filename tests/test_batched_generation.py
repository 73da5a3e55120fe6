"""lm-eval's generate_until through the continuous batcher: the same text as generate() at batch
1 and batched, with stop strings cut where generate() cuts them, for Ouro and MELT; the row's
path says which ran, and what the batcher cannot serve goes through generate()."""

import pytest
from lm_eval.api.instance import Instance

from melt_bench.evaluation.byte_tokenizer import byte_tokenizer
from melt_bench.evaluation.lm_eval_adapter import LoopedHFLM
from melt_bench.models import load_model

PROMPTS = ["Question: 1+1?\nAnswer:", "Question: what is the capital of France, in one word?\nAnswer:", "Q: x\nA:",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\nAnswer:"]


def requests(until_each: list[list[str]], max_gen_toks: int = 10) -> list:
    return [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": max_gen_toks}), i)
            for i, (p, until) in enumerate(zip(PROMPTS, until_each))]


def generated(model, batch_size: int, generate_with: str, reqs) -> tuple[list[str], str]:
    lm = LoopedHFLM(model, byte_tokenizer(), loops=3, batch_size=batch_size, max_length=512,
                    generate_with=generate_with)
    return lm.generate_until(reqs), lm.generation_path


@pytest.mark.parametrize("name", ["ouro-tiny", "melt-tiny"])
def test_the_batcher_generates_the_text_generate_does_with_stop_strings(name):
    model = load_model(name)
    plain, _ = generated(model, 1, "generate", requests([["\n\n"]] * len(PROMPTS)))
    # stop strings taken from each text itself, so that they cut it (the last keeps its whole text)
    until = [[text[2:4]] if len(text) >= 4 else ["never there"] for text in plain[:-1]] + [["never there"]]
    assert sum(len(text) >= 4 for text in plain[:-1]) >= 2  # at least two get cut
    reqs = requests(until)
    reference, path = generated(model, 1, "generate", reqs)
    assert path.startswith("generate()")
    assert reference == [t.split(u[0])[0] for t, u in zip(plain, until)] != plain
    for slots in (1, 3):
        texts, path = generated(model, slots, "continuous-batching", reqs)
        assert texts == reference, slots
        assert path == f"continuous batching, {slots} slots, eager decode engine"
    batched, _ = generated(model, 3, "generate", reqs)
    assert batched == reference


def test_the_path_names_the_slots_that_ran():
    lm = LoopedHFLM(load_model("ouro-tiny"), byte_tokenizer(), loops=3, batch_size=8, max_length=512)
    lm.generate_until(requests([["\n\n"]] * 2)[:2])  # two requests fill two of the eight slots asked for
    assert lm.generation_path == "continuous batching, 2 slots, eager decode engine"


def test_what_the_batcher_cannot_serve_goes_through_generate():
    lm = LoopedHFLM(load_model("ouro-tiny"), byte_tokenizer(), loops=3, batch_size=2, max_length=512,
                    exit_mode="step:1")
    lm.generate_until(requests([["\n\n"]] * 2)[:2])
    assert lm.generation_path.startswith("generate(), left-padded batches of 2 (exit mode step:1")
    sampled = [Instance("generate_until", {}, (PROMPTS[0], {"until": ["\n"], "do_sample": True, "temperature": 0.7}),
                        0)]
    lm = LoopedHFLM(load_model("ouro-tiny"), byte_tokenizer(), loops=3, batch_size=2, max_length=512)
    lm.generate_until(sampled)
    assert lm.generation_path.endswith("(sampling asked)")


def test_melt_prompts_across_its_chunk_grid_get_their_batch_one_text_at_any_slot_count():
    """Left padding moves a prompt on MELT's chunk grid, so generate() over a padded batch can
    differ from batch 1; the batcher prefills each request alone: batch 1's text at any slot count."""
    import torch

    from melt_bench.models import MeltForCausalLM
    from melt_bench.models.preset_table import get_preset

    config = get_preset("melt-tiny").config()
    config.chunk_size = 16  # every prompt crosses the grid
    torch.manual_seed(0)
    model = MeltForCausalLM(config).eval()
    reqs = requests([["\n\n"]] * len(PROMPTS))
    alone, _ = generated(model, 1, "generate", reqs)
    for slots in (1, 4):
        assert generated(model, slots, "continuous-batching", reqs)[0] == alone
