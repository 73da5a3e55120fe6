"""The small-scale MELT conversion proof, end to end on a CPU (tens of minutes on 2 cores):
data -> tiny Ouro teacher -> MELT straight from from_ouro -> melt-bench convert -> melt-bench
accuracy for all three on the held-out split, into one results file and its HTML report.

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


def flag(key: str, value) -> str:
    """A recipe entry as a command-line option: `decode_chunks: true` -> --decode-chunks."""
    name = f"--{key.replace('_', '-')}"
    return name if value is True else f"{name}={value}"


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
    teacher, fresh = work / "teacher", work / "melt-fresh"
    if not (teacher / "config.json").exists():
        run(sys.executable, str(Path(__file__).parent / "train_tiny_ouro.py"), "--data-dir", str(work / "data"),
            "--out", str(teacher), "--steps", str(teach["steps"]), "--batch-size", str(teach["batch_size"]),
            "--hidden", str(teach["hidden"]), "--layers", str(teach["layers"]), "--loops", str(teach["loops"]),
            "--lr", str(teach["lr"]))
    melt = MeltForCausalLM.from_ouro(OuroForCausalLM.from_pretrained(str(teacher)), chunk_size=conv["chunk_size"])
    melt.save_pretrained(fresh)
    byte_tokenizer().save_pretrained(fresh)
    evaluated = [("ouro-tiny", teacher), ("melt-tiny", fresh)]
    # the recipe's conversion, then each ablation: the same conversion with some settings changed
    for name, changes in {"melt-converted": {}, **recipe.get("ablations", {})}.items():
        out = work / name
        if not (out / "model" / "config.json").exists():
            run("melt-bench", "convert", "--from", str(teacher), "--out", str(out),
                "--data", str(work / "data" / "addition" / "train.jsonl"), "--device", "cpu", "--no-progress",
                *[flag(key, value) for key, value in {**conv, **changes}.items() if value is not False], "--resume")
        evaluated.append(("melt-tiny", out / "model"))
    results = work / "accuracy.jsonl"
    for model, weights in evaluated:
        run("melt-bench", "accuracy", "--tasks", data["task"], "--models", model, "--weights", str(weights),
            "--loops", ev["loops"], "--data-dir", str(work / "data"),
            *(["--limit", str(ev["limit"])] if ev.get("limit") else []),
            "--batch-size", str(ev["batch_size"]), "--device", "cpu", "--dtype", "float32",
            "--out", str(results), "--resume")
    run("melt-bench", "report", str(results), "-o", str(work / "report.html"))
    print(f"results in {results}, report in {work / 'report.html'}")


if __name__ == "__main__":
    main()
