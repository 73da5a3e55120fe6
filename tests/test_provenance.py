"""Labels say what the code does: help texts against the defaults they name, and the figures of
the README and docs/ against what the code computes today and where they were measured."""

import re
from pathlib import Path

import torch

from melt_bench.cli import main
from melt_bench.models import cost_model, get_preset
from melt_bench.running.sweep_options import CPU_DEFAULTS, CUDA_DEFAULTS
from melt_bench.scenarios.measure_memory import predicted_peak
from melt_bench.scenarios.memory import MemoryPoint

ROOT = Path(__file__).resolve().parents[1]
# the user's guide and the notes split from it: a figure is checked wherever it now stands
README = "\n\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def help_text(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one option a line, nothing wrapped
    assert main([command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_names_the_defaults_the_code_uses_and_keeps_the_ray_extra(capsys, monkeypatch):
    text = help_text("memory", capsys, monkeypatch)
    assert f"default: {CUDA_DEFAULTS['batch_sizes']} on CUDA, {CPU_DEFAULTS['batch_sizes']} on CPU" in text
    assert 'pip install "melt-bench[ray]"' in text  # rich markup once ate "[ray]"
    assert "melt-bench's own construction" in text  # --decode-reads chunk is ours, not the paper's
    assert "prompt_kv_shared" in text and "(exact;" not in text  # --prefill-chunk is exact only per-loop


def test_the_predicted_peak_in_the_readme_is_what_the_code_computes():
    model = type("Stub", (), {"config": get_preset("ouro-1.4b").config()})()
    point = MemoryPoint("memory", "ouro-1.4b", 1, 4096, 1, "decode", 16, "bfloat16", "cuda:0")
    predicted = predicted_peak(model, point, 4096, 4096 + 16, torch.bfloat16)["predicted_peak_bytes"]
    assert f"as the code\ncomputes them today, come to {predicted / 2**30:.2f} GiB" in README


def test_parameter_counts_in_the_readme_belong_to_the_models_they_name():
    for name, label in (("melt-1.4b", "MELT-1.4B ("), ("melt-2.6b", "MELT-2.6B\n  (")):
        count = cost_model.weights_bytes(get_preset(name).config(), torch.float32) // 4
        assert f"{label}{count / 1e9:.3f} billion" in README
    for name, label in (("ouro-1.4b", "Ouro-1.4B"), ("ouro-2.6b", "Ouro-2.6B")):
        count = cost_model.weights_bytes(get_preset(name).config(), torch.float32) // 4
        assert re.search(rf"{label}\s+{count / 1e9:.3f}\s+billion", README), label
    assert "Ouro-1.4B (1.64 billion" not in README


def test_every_gpu_figure_in_the_readme_names_its_device_date_and_source():
    for paragraph in (" ".join(p.split()) for p in README.split("\n\n")):
        if re.search(r"\bon (an|the) H100\b|H100 80GB", paragraph):
            assert "NVIDIA H100 80GB HBM3" in paragraph, paragraph[:80]
            assert re.search(r"20\d\d-\d\d-\d\d", paragraph), paragraph[:80]
            assert "melt-bench " in paragraph or "benchmarks/" in paragraph or "convert" in paragraph, paragraph[:80]
