"""Nothing lost, nothing mixed, every failure one line (issue 12): each test fails on the code
before the fix."""

import os
import signal
import subprocess
import sys
import time

import pytest

from melt_bench.cli import main
from melt_bench.results import ResultsStore

from sweep_helpers import write_rows

SWEEP = ["--models", "ouro-tiny,melt-tiny", "--seq-lens", "32", "--batch-sizes", "1", "--new-tokens", "2",
         "--device", "cpu", "--dtype", "float32", "--no-progress"]


def one_error_line(capsys, needle: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    return lines[0]


@pytest.fixture
def latency_results(tmp_path):
    path = tmp_path / "latency.jsonl"
    write_rows(path, "latency", 3)
    return path


@pytest.mark.parametrize("target", ["same", "other"])
def test_a_report_never_replaces_a_results_file(target, latency_results, tmp_path, capsys):
    other = tmp_path / "memory.jsonl"
    write_rows(other, "memory", 2)
    output = latency_results if target == "same" else other
    before = output.read_bytes()
    assert main(["report", str(latency_results), "-o", str(output)]) == 2
    one_error_line(capsys, "a report never replaces results")
    assert output.read_bytes() == before


def test_an_older_report_may_be_overwritten(latency_results, tmp_path):
    output = tmp_path / "report.html"
    output.write_text("<html>STALE-REPORT-7f3a</html>")
    assert main(["report", str(latency_results), "-o", str(output)]) == 0
    assert "STALE-REPORT-7f3a" not in output.read_text() and "<html" in output.read_text()
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_report_of_an_empty_file_is_one_line(content, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 2
    one_error_line(capsys, "holds no results rows")


def test_report_to_an_unwritable_place_is_one_line(latency_results, capsys):
    assert main(["report", str(latency_results), "-o", "/proc/melt-bench-report.html"]) == 2
    one_error_line(capsys, "cannot create a file in /proc")


@pytest.mark.parametrize("command,extra", [
    ("memory", ["--loops", "1"]),
    ("latency", ["--loops", "1", "--warmup", "0", "--repeats", "1"]),
])
def test_resuming_into_another_kind_is_refused(command, extra, latency_results, tmp_path, capsys):
    target = latency_results if command == "memory" else tmp_path / "memory.jsonl"
    if command == "latency":
        write_rows(target, "memory", 2)
    before = target.read_bytes()
    assert main([command, *extra, *SWEEP, "--resume", "--out", str(target)]) == 2
    one_error_line(capsys, "a results file holds one kind")
    assert target.read_bytes() == before


def test_accuracy_resuming_into_memory_results_is_refused(tmp_path, capsys):
    target = tmp_path / "memory.jsonl"
    write_rows(target, "memory", 2)
    before = target.read_bytes()
    data = os.path.join(os.path.dirname(__file__), "data")
    assert main(["accuracy", "--tasks", "gsm8k", "--data-dir", data, "--limit", "1", "--loops", "1",
                 "--models", "ouro-tiny", "--device", "cpu", "--resume", "--out", str(target)]) == 2
    one_error_line(capsys, "a results file holds one kind")
    assert target.read_bytes() == before


@pytest.mark.parametrize("out,needle", [("/proc/melt-bench.jsonl", "cannot create a file in /proc"),
                                        ("FILE/x.jsonl", "is a file, not a directory"),
                                        ("DIR/", "is a directory")])
def test_output_paths_are_checked_before_any_point_runs(out, needle, tmp_path, capsys):
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "DIR").mkdir()
    path = out if out.startswith("/") else str(tmp_path / out) + ("/" if out.endswith("/") else "")
    started = time.monotonic()
    assert main(["memory", "--loops", "1", *SWEEP, "--out", path]) == 2
    one_error_line(capsys, needle)
    assert time.monotonic() - started < 5  # refused up front, not after a point ran
    assert list((tmp_path / "DIR").iterdir()) == []


def test_ctrl_c_stops_the_sweep_keeps_rows_and_exits_130(tmp_path):
    """A real SIGINT to the sweep's process group, as a terminal sends it."""
    out = tmp_path / "sweep.jsonl"
    command = [sys.executable, "-m", "melt_bench", "memory", "--loops", "1..16", "--models", "ouro-tiny,melt-tiny",
               "--seq-lens", "512", "--batch-sizes", "4", "--device", "cpu", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    rows = ResultsStore(out).read()
    assert proc.returncode == 130, stderr
    assert 2 <= len(rows) < 32 and all(row.status == "ok" for row in rows)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and f"{len(rows)} of 32 points recorded" in lines[0] and "--resume" in lines[0], stderr
    assert stdout.strip() == ""


@pytest.fixture
def offline(monkeypatch):
    """A machine whose hub is out of reach (the probe answers at once) and whose cache is empty."""
    from melt_bench import hub

    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda timeout_s=3.0: "huggingface.co:443 unreachable (test)")
    monkeypatch.setattr(hub, "in_local_cache", lambda repo_id: False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_unreachable_hub_id_stops_before_any_point(offline, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert main(["memory", "--loops", "1", *SWEEP, "--weights", "ByteDance/Ouro-1.4B", "--out", str(out)]) == 2
    one_error_line(capsys, "pass a local checkpoint directory")
    assert not out.exists()


def test_hf_hub_offline_without_a_cached_copy_is_one_line(offline, tmp_path, capsys):
    offline.setenv("HF_HUB_OFFLINE", "1")
    assert main(["latency", "--loops", "1", *SWEEP, "--weights", "ByteDance/Ouro-1.4B",
                 "--out", str(tmp_path / "l.jsonl")]) == 2
    one_error_line(capsys, "HF_HUB_OFFLINE is set")


def test_a_cached_hub_id_passes_offline(offline):
    from melt_bench import hub
    from melt_bench.sweep_options import check_weights

    offline.setattr(hub, "in_local_cache", lambda repo_id: True)
    assert check_weights("ByteDance/Ouro-1.4B") == "ByteDance/Ouro-1.4B"


def test_accuracy_without_data_dir_offline_names_data_dir(offline, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert main(["accuracy", "--tasks", "gsm8k", "--loops", "1", "--models", "ouro-tiny", "--device", "cpu",
                 "--out", str(out)]) == 2
    one_error_line(capsys, "--data-dir")
    assert not out.exists()
