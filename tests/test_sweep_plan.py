"""Range grammar, suites, and flag resolution."""

import pytest

from melt_bench.running import hub
from melt_bench.running.ranges import RangeError, parse_int_list, parse_name_list
from melt_bench.running.suite_loader import SuiteError, load_suite, shipped_suites
from melt_bench.running.sweep_options import OptionError, SweepFlags, check_weights, resolve_sweep
from melt_bench.scenarios.memory import MemoryPoint


@pytest.mark.parametrize(
    "text,expected",
    [("1..4", [1, 2, 3, 4]), ("1..16:4", [1, 5, 9, 13]), ("1,2,4,8", [1, 2, 4, 8]),
     ("1..3,8,16", [1, 2, 3, 8, 16]), ("4,4,1..2", [4, 1, 2]), (" 2 , 3 ", [2, 3])],
)
def test_range_grammar(text, expected):
    assert parse_int_list(text, "--loops") == expected


@pytest.mark.parametrize("text", ["16..1", "0", "-2", "a..b", "1,,2", "", "1..4:0", "1.5", "3..", "0..4"])
def test_bad_ranges_name_option_and_text(text):
    with pytest.raises(RangeError) as info:
        parse_int_list(text, "--loops")
    message = str(info.value)
    assert message.startswith("--loops:") and "\n" not in message


def test_name_lists():
    assert parse_name_list("ouro-tiny, melt-tiny", "--models") == ["ouro-tiny", "melt-tiny"]
    with pytest.raises(RangeError, match="empty item"):
        parse_name_list("ouro-tiny,", "--models")


def test_shipped_suites_load_and_resolve():
    assert {"smoke", "paper", "long-context"} <= set(shipped_suites())
    paper = load_suite("paper")
    assert paper["models"] == ["ouro-1.4b", "melt-1.4b"] and paper["loops"] == "1..16"
    smoke = resolve_sweep("memory", SweepFlags(), "smoke")
    assert smoke.spec.models == ["ouro-tiny", "melt-tiny"] and smoke.spec.device == "cpu"
    assert len(smoke.spec.points()) == 2 * 4 * 2


def test_flags_win_over_the_suite(tmp_path):
    suite = tmp_path / "mine.yaml"
    suite.write_text("models: [ouro-tiny]\nloops: [1, 2]\nseq_lens: 32\nbatch_sizes: '1,2'\ndevice: cpu\n")
    resolved = resolve_sweep("memory", SweepFlags(loops="4..5"), str(suite))
    assert resolved.spec.loops == [4, 5] and resolved.spec.models == ["ouro-tiny"]
    assert resolved.spec.seq_lens == [32] and resolved.spec.batch_sizes == [1, 2]


@pytest.mark.parametrize(
    "flags,suite_text,needle",
    [({"models": "ouro-9b"}, None, "unknown model 'ouro-9b'"), ({"loops": "16..1"}, None, "--loops"),
     ({"phase": "train"}, None, "--phase"), ({"dtype": "int3"}, None, "--dtype"),
     ({"device": "cuda"}, None, "CUDA is not available"), ({"loops": "65"}, None, "maximum of 64"),
     ({}, "loops: [1\n", "not valid YAML"), ({}, "colour: red\n", "unknown setting(s) colour"),
     ({"weights": "/no/such/dir"}, None, "no such directory")],
)
def test_bad_options_are_one_line_errors(tmp_path, flags, suite_text, needle):
    suite = None
    if suite_text is not None:
        suite = str(tmp_path / "bad.yaml")
        (tmp_path / "bad.yaml").write_text(suite_text)
    with pytest.raises(OptionError) as info:
        resolve_sweep("memory", SweepFlags(**{"device": "cpu", **flags}), suite)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_suite_is_named():
    with pytest.raises(SuiteError, match="no-such-suite"):
        load_suite("no-such-suite")


def test_weights_accepts_dirs_with_config_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda timeout_s=3.0: None)  # a reachable hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert check_weights("ByteDance/Ouro-1.4B") == "ByteDance/Ouro-1.4B"
    with pytest.raises(OptionError, match="no config.json"):
        check_weights(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "ouro"}')
    assert check_weights(str(tmp_path)) == str(tmp_path.resolve())
    for text, needle in (("{}", "no model_type"), ("{not json", "not JSON"), ('{"model_type": "llama"}', "'llama'")):
        (tmp_path / "config.json").write_text(text)  # refused before any point runs (it ran as failed points)
        with pytest.raises(OptionError, match=needle):
            check_weights(str(tmp_path))


def test_point_ids_are_content_hashes():
    a = MemoryPoint("memory", "ouro-tiny", 2, 64, 1, "decode", 8, "float32", "cpu")
    b = MemoryPoint("memory", "ouro-tiny", 2, 64, 1, "decode", 8, "float32", "cpu")
    c = MemoryPoint("memory", "ouro-tiny", 3, 64, 1, "decode", 8, "float32", "cpu")
    assert a.point_id == b.point_id != c.point_id


def test_prefill_points_ignore_new_tokens():
    a = resolve_sweep("memory", SweepFlags(device="cpu", phase="prefill", new_tokens=5), None)
    b = resolve_sweep("memory", SweepFlags(device="cpu", phase="prefill", new_tokens=9), None)
    assert [p.point_id for p in a.spec.points()] == [p.point_id for p in b.spec.points()]


def test_a_row_records_only_the_settings_its_command_has():
    """#24: a memory row once said `engine: eager, warmup: 0` for an engine it never ran; each
    command's point type holds its own settings (latency: engine and timing; capacity: a budget,
    and engine and timing only when it times throughput). Ids are those the points had before."""
    from melt_bench.running.sweep_plan import SweepSpec
    from melt_bench.scenarios.capacity import CapacityOptions
    from melt_bench.scenarios.latency import LatencyOptions
    from melt_bench.scenarios.memory import MemoryOptions

    def one(command, options):
        [point] = SweepSpec(command, ["ouro-tiny"], [2], [64], [1], new_tokens=4, dtype="float32").points(options)
        return point

    memory = one("memory", MemoryOptions())
    assert {"engine", "warmup", "timed_runs", "memory_budget_bytes"}.isdisjoint(memory.to_dict())
    latency = one("latency", LatencyOptions(warmup=1, timed_runs=3))
    assert latency.to_dict()["engine"] == "eager" and "memory_budget_bytes" not in latency.to_dict()
    capacity = one("capacity", CapacityOptions(2**30, timed_runs=0))
    assert capacity.to_dict()["memory_budget_bytes"] == 2**30 and "engine" not in capacity.to_dict()
    assert capacity.batch_size == 0  # searched
    assert "engine" in one("capacity", CapacityOptions(2**30, timed_runs=3)).to_dict()
    assert memory.point_id == "fba46d4915866c77"  # the id this point had before rows dropped those fields


# Ids of points as the command line planned them before each command had its own point type
# (melt-bench at ae23461): results files written then still resume.
PINNED_IDS = [
    (["memory", "--models", "ouro-tiny", "--loops", "2", "--new-tokens", "2", "--repeats", "1", "--prefill-chunk",
      "8"], "a0d95c05d17b2e05"),
    (["latency", "--models", "melt-tiny", "--loops", "2", "--new-tokens", "2", "--engine", "compiled", "--warmup", "1",
      "--repeats", "2", "--early-exit", "threshold:0.5", "--prefill-chunk", "4"], "92644a318715e7ab"),
    (["latency", "--models", "ouro-tiny", "--loops", "2", "--engine", "forward", "--kv-quant", "int8"],
     "9ce4dcd4d55be9f2"),
    (["latency", "--models", "melt-tiny", "--loops", "3", "--batch-sizes", "2", "--engine", "forward",
      "--static-cache"], "bbd3ae641f5cc766"),
    (["latency", "--models", "ouro-tiny", "--loops", "2", "--kv-policy", "last-loop"], "132af79ac933a3e5"),
    (["capacity", "--budget", "1GiB", "--models", "ouro-tiny", "--loops", "2"], "5a87dc84edb6c52b"),
    (["capacity", "--budget", "1GiB", "--models", "melt-tiny", "--loops", "2", "--timed-runs", "0",
      "--decode-reads", "chunk"], "0fae71390f27c7d4"),
]


@pytest.mark.parametrize("argv,point_id", PINNED_IDS, ids=[" ".join(argv[:1] + argv[-2:]) for argv, _ in PINNED_IDS])
def test_point_ids_of_earlier_results_stay(argv, point_id, capsys):
    import json

    from melt_bench.cli import main

    batch = ["--batch-sizes", "1"] if argv[0] != "capacity" and "--batch-sizes" not in argv else []
    shape = ["--seq-lens", "16", "--device", "cpu", *batch]
    dtype = ["--dtype", "float32"] if argv[0] == "memory" or "compiled" in argv else []
    assert main([*argv, *shape, *dtype, "--dry-run", "--json"]) == 0
    planned = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [point["point_id"] for point in planned] == [point_id]
