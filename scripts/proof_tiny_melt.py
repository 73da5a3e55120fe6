"""The small-scale MELT conversion proof, end to end on a CPU (tens of minutes on 2 cores):
data -> tiny Ouro teacher -> MELT straight from from_ouro -> melt-bench convert -> melt-bench
accuracy for all three on the held-out split, into one results file the report can draw.

    python scripts/proof_tiny_melt.py --work results/tiny-melt-proof
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from melt_bench.byte_tokenizer import byte_tokenizer
from melt_bench.models import MeltForCausalLM, OuroForCausalLM
from melt_bench.tiny_tasks import write_addition

RECIPE = Path(__file__).resolve().parent.parent / "suites" / "tiny-melt-proof.yaml"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/tiny-melt-proof"))
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    args = parser.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    work, data, teach, conv, ev = args.work, recipe["data"], recipe["teacher"], recipe["convert"], recipe["evaluate"]
    work.mkdir(parents=True, exist_ok=True)
    write_addition(work / "data", data["digits"], data["train"], data["test"], data["seed"])
    teacher, fresh, converted = work / "teacher", work / "melt-fresh", work / "melt-converted"
    if not (teacher / "config.json").exists():
        run(sys.executable, str(Path(__file__).parent / "train_tiny_ouro.py"), "--data-dir", str(work / "data"),
            "--out", str(teacher), "--steps", str(teach["steps"]), "--batch-size", str(teach["batch_size"]),
            "--hidden", str(teach["hidden"]), "--layers", str(teach["layers"]), "--loops", str(teach["loops"]),
            "--lr", str(teach["lr"]))
    melt = MeltForCausalLM.from_ouro(OuroForCausalLM.from_pretrained(str(teacher)), chunk_size=conv["chunk_size"])
    melt.save_pretrained(fresh)
    byte_tokenizer().save_pretrained(fresh)
    if not (converted / "model" / "config.json").exists():
        run("melt-bench", "convert", "--from", str(teacher), "--out", str(converted),
            "--data", str(work / "data" / "addition" / "train.jsonl"), "--device", "cpu", "--no-progress",
            *[f"--{key.replace('_', '-')}={value}" for key, value in conv.items()], "--resume")
    results = work / "accuracy.jsonl"
    for model, weights in (("ouro-tiny", teacher), ("melt-tiny", fresh), ("melt-tiny", converted / "model")):
        run("melt-bench", "accuracy", "--tasks", data["task"], "--models", model, "--weights", str(weights),
            "--loops", ev["loops"], "--data-dir", str(work / "data"), "--limit", str(ev["limit"]),
            "--batch-size", str(ev["batch_size"]), "--device", "cpu", "--dtype", "float32",
            "--out", str(results), "--resume")
    print(f"results in {results}")


if __name__ == "__main__":
    main()
