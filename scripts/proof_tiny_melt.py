"""The small-scale MELT conversion proof, end to end on a CPU (tens of minutes on 2 cores):
data -> tiny Ouro teacher -> MELT straight from from_ouro -> melt-bench convert -> melt-bench
accuracy on the held-out split for the teacher under every training-free KV policy of the recipe
and for each MELT, into one results file (exact match and measured KV bytes per token per loop
count) and its HTML report (with the accuracy / KV-bytes Pareto plot).

    python scripts/proof_tiny_melt.py --work results/tiny-melt-proof
    python scripts/proof_tiny_melt.py --work results/tiny-melt-proof --recipe suites/tiny-melt-packed.yaml

Recipes that share `data` and `teacher` settings share the work directory's data and teacher;
each writes its own results file and report, named after the recipe (NAME.jsonl, NAME.html).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from melt_bench.evaluation.byte_tokenizer import byte_tokenizer
from melt_bench.evaluation.tiny_tasks import write_addition
from melt_bench.models import MeltForCausalLM, OuroForCausalLM

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
    # a recipe may train its own teacher (another shape, or packed sequences): `teacher_dir`
    teacher = work / recipe.get("teacher_dir", "teacher")
    fresh = work / ("melt-fresh" if teacher.name == "teacher" else f"melt-fresh-{teacher.name}")
    if (teacher / "config.json").exists():
        check_teacher(teacher, teach)
    else:
        run(sys.executable, str(Path(__file__).parent / "train_tiny_ouro.py"), "--data-dir", str(work / "data"),
            "--out", str(teacher), "--steps", str(teach["steps"]), "--batch-size", str(teach["batch_size"]),
            "--hidden", str(teach["hidden"]), "--layers", str(teach["layers"]), "--loops", str(teach["loops"]),
            "--lr", str(teach["lr"]), *(["--pack-to", str(teach["pack_to"])] if teach.get("pack_to") else []))
    melt = MeltForCausalLM.from_ouro(OuroForCausalLM.from_pretrained(str(teacher)), chunk_size=conv["chunk_size"])
    melt.save_pretrained(fresh)
    byte_tokenizer().save_pretrained(fresh)
    # the teacher runs once per training-free KV policy (one sweep axis); MELT keeps its own
    teacher_policies = ["--kv-policy", ev["kv_policies"]] if ev.get("kv_policies") else []
    # MELT: what decoded tokens read, "final" rows or the chunk grid continued (issue 14)
    melt_reads = ["--decode-reads", ev["decode_reads"]] if ev.get("decode_reads") else []
    evaluated = [("ouro-tiny", teacher, teacher_policies), ("melt-tiny", fresh, melt_reads)]
    # the recipe's conversion, then each ablation: the same conversion with some settings changed
    for name, changes in {recipe.get("converted", "melt-converted"): {}, **recipe.get("ablations", {})}.items():
        out = work / name
        if not (out / "model" / "config.json").exists():
            run("melt-bench", "convert", "--from", str(teacher), "--out", str(out),
                "--data", str(work / "data" / "addition" / "train.jsonl"), "--device", "cpu", "--no-progress",
                *[flag(key, value) for key, value in {**conv, **changes}.items() if value is not False], "--resume")
        evaluated.append(("melt-tiny", out / "model", melt_reads))
    # the 2026 rivals (issue 22): FlashLoop's cache and KV quantisation, on the same teacher and MELT
    named = {"teacher": ("ouro-tiny", teacher), "melt": ("melt-tiny", work / recipe.get("converted", "melt-converted")
                                                          / "model")}
    for rival in recipe.get("rivals", []):
        model, weights = named[rival["model"]]
        evaluated.append((model, weights, [flag(key, value) for key, value in rival.items() if key != "model"]))
    results = work / recipe.get("results", f"{recipe['name']}.jsonl")
    for model, weights, policies in evaluated:
        run("melt-bench", "accuracy", "--tasks", data["task"], "--models", model, "--weights", str(weights), *policies,
            "--loops", ev["loops"], "--data-dir", str(work / "data"),
            *(["--limit", str(ev["limit"])] if ev.get("limit") else []),
            *(["--kv-probe-tokens", str(ev["kv_probe_tokens"])] if ev.get("kv_probe_tokens") else []),
            *([] if any(p.startswith("--batch-size") for p in policies) else ["--batch-size", str(ev["batch_size"])]),
            "--device", "cpu", "--dtype", "float32",
            "--out", str(results), "--resume")
    report = results.with_suffix(".html")
    run("melt-bench", "report", str(results), "-o", str(report))
    print(f"results in {results}, report in {report}")


def check_teacher(teacher: Path, settings: dict) -> None:
    """A teacher already in the work directory must be the recipe's: same shape and loops."""
    config = json.loads((teacher / "config.json").read_text())
    have = (config["hidden_size"], config["num_hidden_layers"], config["total_ut_steps"],
            config["max_position_embeddings"])
    want = (settings["hidden"], settings["layers"], settings["loops"], max(256, settings.get("pack_to") or 0))
    if have != want:
        raise SystemExit(f"{teacher} holds a teacher of (hidden, layers, loops, positions) {have}, the recipe asks "
                         f"{want}: use another --work directory or teacher_dir")


if __name__ == "__main__":
    main()
