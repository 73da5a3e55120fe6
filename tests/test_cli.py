"""The command line: models, env, and one-line errors with exit code 2."""

import json
import subprocess
import sys
import types

import pytest

from melt_bench.cli import main
from melt_bench.trackers.nvml import NvmlUnavailable, read_nvml


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "melt_bench", *args], capture_output=True, text=True, timeout=120)


def test_models_json_lists_presets_with_paper_kv_figures(capsys):
    assert main(["models", "--json"]) == 0
    cards = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert {"ouro-1.4b", "ouro-2.6b", "ouro-tiny", "melt-1.4b", "melt-2.6b", "melt-tiny"} <= set(cards)
    assert cards["ouro-1.4b"]["kv_bytes_per_token_at_loops"] == 786_432
    assert cards["ouro-1.4b"]["kv_bytes_per_token_per_loop"] == 196_608
    assert cards["melt-1.4b"]["kv_bytes_per_token_at_loops"] == 196_608
    assert cards["melt-1.4b"]["kv_bytes_per_token_per_loop"] == 0
    assert 1.43e9 < cards["ouro-1.4b"]["parameters"] < 1.44e9  # ~1.435 B published
    assert cards["melt-1.4b"]["parameters"] - cards["ouro-1.4b"]["parameters"] == 24 * (2 * 2048 * 2048 + 2048)


def test_models_table_via_console_script():
    result = run_cli("models")
    assert result.returncode == 0
    assert "ouro-1.4b" in result.stdout and "786,432" in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [(["models", "--dtype", "int3"], "--dtype"), (["models", "--bogus"], "--bogus"), (["nope"], "nope")],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def fake_pynvml(fail_init=False):
    """A stand-in for nvidia-ml-py: one 80 GiB device with 1 GiB in use."""
    mod = types.ModuleType("pynvml")
    state = {"init": 0, "shutdown": 0}

    def nvmlInit():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        state["init"] += 1

    mod.nvmlInit = nvmlInit
    mod.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    mod.nvmlSystemGetDriverVersion = lambda: b"580.159.04"
    mod.nvmlSystemGetNVMLVersion = lambda: "13.580.159.04"
    mod.nvmlSystemGetCudaDriverVersion = lambda: 13000
    mod.nvmlDeviceGetCount = lambda: 1
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    mod.nvmlDeviceGetUUID = lambda h: "GPU-1234"
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30, used=2**30, free=79 * 2**30)
    mod.state = state
    return mod


def test_read_nvml_through_a_fake(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = read_nvml()
    assert info.driver_version == "580.159.04" and info.cuda_driver_version == "13.0"
    assert info.devices[0].memory_used_bytes == 2**30 and info.devices[0].name.startswith("NVIDIA H100")
    assert fake.state == {"init": 1, "shutdown": 1}


def test_nvml_failure_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    with pytest.raises(NvmlUnavailable, match="Not Found"):
        read_nvml()
    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["nvml"] is None and "Not Found" in facts["nvml_error"]


def test_env_shows_nvml_facts(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["nvml"]["driver_version"] == "580.159.04"
    assert facts["torch"] and facts["transformers"].startswith("5.")
    assert main(["env"]) == 0
    assert "NVIDIA H100 80GB HBM3" in capsys.readouterr().out


def test_run_flags_reach_a_command_as_run_options_and_placement():
    """The flags every run takes are declared once (commands/options.run_flags) and arrive typed."""
    from pathlib import Path

    import typer
    from typer.testing import CliRunner

    from melt_bench.commands.options import run_flags
    from melt_bench.commands.support import Placement, RunOptions

    app, seen = typer.Typer(), []

    @app.command()
    @run_flags()
    def probe(loops: int = typer.Option(1), run: RunOptions = None, placement: Placement = None) -> None:
        seen.append((loops, run, placement))

    result = CliRunner().invoke(app, ["--loops", "3", "--out", "r.jsonl", "--resume", "--dry-run", "--no-progress",
                                      "--gpus", "0,1", "--executor", "ray"])
    assert result.exit_code == 0, result.output
    [(loops, run, placement)] = seen
    assert loops == 3 and run == RunOptions(Path("r.jsonl"), resume=True, progress=False, dry_run=True)
    assert placement == Placement("0,1", "ray")

    evaluation = typer.Typer()

    @evaluation.command()
    @run_flags(plan=False)  # accuracy: no plan to show
    def evaluate(run: RunOptions = None, placement: Placement = None) -> None:
        pass

    shown = CliRunner().invoke(evaluation, ["--help"]).output
    assert "--dry-run" not in shown and "--retry-failed" in shown and "--allow-busy-gpus" in shown
