"""Run the official Huginn code on a small random model and save its outputs as a test fixture
(tests/fixtures/huginn_reference.pt) for tests/test_huginn.py.

The official modeling code is not vendored: point --official at a directory holding
`raven_modeling_minimal.py` and `raven_config_minimal.py` (a clone of seal-rg/recurrent-pretraining's
`recpre/`, or a snapshot of tomg-group-umd/huginn-0125). It needs a transformers older than ours
(it subclasses `Cache` the 4.4x way), so run this script in a venv of its own, e.g.

    python -m venv --system-site-packages /tmp/huginn-venv
    /tmp/huginn-venv/bin/pip install transformers==4.47.1
    /tmp/huginn-venv/bin/python scripts/huginn_reference_fixture.py --official /path/to/recpre

It imports nothing from melt-bench. Saved: the config, the state dict (random weights, with
qk_bias and norm weights moved off their init so those paths count), and
  - logits of plain forwards at 1, 4 and 12 steps (init_scale=0: a zero initial state),
  - logits and latent states from a given initial state,
  - logits after torch.manual_seed(SEED) with the random state (init_scale=1),
  - for every cache lookup strategy through HuginnDynamicCache (and the ones HuginnStaticCache
    accepts): a prefill then single-token decodes (fixed tokens), the logits of each call, the
    rows the cache holds per layer index and its bytes.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

import torch

CONFIG = dict(n_embd=16, n_heads=2, n_layers=8, block_size=64, vocab_size=32, intermediate_size=32,
              n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2, mean_recurrence=4,
              qk_bias=True, rope_base=50_000, norm_eps=1e-6, tie_embeddings=True, bias=False)
STRATEGIES = ["full", "compress-s4", "compress-s3", "compress-r4", "compress-r3", "compress-anchor", "latest-m4"]
CACHE_STEPS = 10  # 40 core indices: past compress-anchor's 32
SEED = 123
PROMPT, DECODED = 5, 3


def load_official(directory: Path):
    package = Path(tempfile.mkdtemp()) / "huginn_official"
    package.mkdir()
    for name in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        shutil.copy(directory / name, package / name)
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("huginn_official.raven_modeling_minimal"), \
        importlib.import_module("huginn_official.raven_config_minimal")


def cache_run(model, cache, ids: torch.Tensor) -> dict:
    """Prefill ids[:, :PROMPT], then one token at a time; the logits of each call."""
    logits = [model(ids[:, :PROMPT], num_steps=CACHE_STEPS, init_scale=0.0, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(PROMPT)).logits]
    for pos in range(PROMPT, PROMPT + DECODED):
        logits.append(model(ids[:, pos:pos + 1], num_steps=CACHE_STEPS, init_scale=0.0, past_key_values=cache,
                            use_cache=True, cache_position=torch.tensor([pos])).logits)
    return {"logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="directory with raven_modeling_minimal.py")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests/fixtures/huginn_reference.pt")
    args = parser.parse_args()
    modeling, configuration = load_official(args.official)
    import transformers

    torch.manual_seed(0)
    config = configuration.RavenConfig(**CONFIG)
    model = modeling.RavenForCausalLM(config).eval()
    with torch.no_grad():  # move what init leaves at zeros / ones, so a wrong use of them shows
        for name, p in model.named_parameters():
            if "qk_bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, PROMPT + DECODED), generator=generator)
    states = 2 * torch.randn(2, PROMPT + DECODED, CONFIG["n_embd"], generator=generator)
    fixture = {"config": CONFIG, "state_dict": state, "ids": ids, "initial_state": states, "seed": SEED,
               "cache_steps": CACHE_STEPS, "prompt": PROMPT, "transformers": transformers.__version__,
               "torch": torch.__version__, "steps": {}, "dynamic": {}, "static": {}}
    with torch.no_grad():
        for steps in (1, 4, 12):
            fixture["steps"][steps] = model(ids, num_steps=steps, init_scale=0.0).logits
        given = model(ids, num_steps=5, input_states=states)
        fixture["given_state"] = {"steps": 5, "logits": given.logits, "latent_states": given.latent_states}
        torch.manual_seed(SEED)
        fixture["seeded"] = {"steps": 3, "logits": model(ids, num_steps=3).logits}
        for strategy in STRATEGIES:
            cache = modeling.HuginnDynamicCache(lookup_strategy=strategy)
            run = cache_run(model, cache, ids)
            run["rows"] = {index: len(rows) for index, rows in cache.key_cache.items()}
            run["bytes"] = 2 * sum(t.nelement() * t.element_size() for rows in cache.key_cache.values()
                                   for t in rows.values())
            fixture["dynamic"][strategy] = run
            max_steps = 4 + 4 * CACHE_STEPS
            try:
                static = modeling.HuginnStaticCache(PROMPT + DECODED, max_steps, CONFIG["n_heads"],
                                                    CONFIG["n_embd"] // CONFIG["n_heads"], batch_size=2,
                                                    lookup_strategy=strategy)
                run = cache_run(model, static, ids)
            except Exception as error:  # noqa: BLE001  (what the official static cache refuses is recorded)
                fixture["static"][strategy] = {"error": f"{type(error).__name__}: {error}"}
                continue
            run["bytes"] = static.key_cache.nbytes + static.value_cache.nbytes
            fixture["static"][strategy] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"saved {args.out} (transformers {transformers.__version__}, torch {torch.__version__}); static cache: "
          + ", ".join(f"{k}: {'ok' if 'error' not in v else v['error']}" for k, v in fixture["static"].items()))


if __name__ == "__main__":
    main()
