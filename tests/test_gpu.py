"""GPU checks (skipped without CUDA): numerics on the device, cache bytes against the CUDA
allocator, and NVML against a real allocation."""

from functools import partial

import pytest
import torch
from conftest import make_melt, make_ouro

from melt_bench.models import get_preset, predict_kv_cache_bytes
from melt_bench.models.presets import model_class
from melt_bench.trackers.nvml import read_nvml

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("make", [make_ouro, partial(make_melt, chunk_size=1),
                                  partial(make_melt, chunk_size=4, decode_reads="chunk")])  # the grid continued
def test_incremental_matches_full_forward_on_cuda(make, ids):
    model = make().cuda()
    ids = ids.cuda()
    full = model(ids, use_cache=False, loops=4).logits
    cache = model.new_cache(4, capacity=ids.shape[1])
    steps = [model(ids[:, :5], past_key_values=cache, loops=4).logits]
    steps += [model(ids[:, i : i + 1], past_key_values=cache, loops=4).logits for i in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-3, atol=1e-3)


def allocator_delta_of_cache(model, ids, loops, capacity):
    with torch.no_grad():
        model(ids, use_cache=False, loops=loops, logits_to_keep=1)  # warm-up: cuBLAS workspace etc.
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        cache = model.new_cache(loops, capacity=capacity)
        out = model(ids, past_key_values=cache, loops=loops, logits_to_keep=1)
        del out
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before, cache


@cuda
@pytest.mark.parametrize("make", [make_ouro, make_melt])
@pytest.mark.parametrize("loops", [1, 4, 8])
def test_cache_bytes_equal_what_the_cuda_allocator_holds(make, loops, ids):
    model = make().cuda().to(torch.bfloat16)
    delta, cache = allocator_delta_of_cache(model, ids.cuda(), loops, capacity=256)
    expected = predict_kv_cache_bytes(model.config, loops, ids.shape[0], 256, torch.bfloat16)
    assert delta == cache.nbytes() == expected


@cuda
@pytest.mark.parametrize("preset,per_token", [("ouro-1.4b", 786_432), ("melt-1.4b", 196_608)])
def test_1_4b_cache_on_the_gpu(preset, per_token):
    torch.manual_seed(0)
    p = get_preset(preset)
    model = model_class(p.family)(p.config()).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 49152, (1, 1024), device="cuda")
    delta, cache = allocator_delta_of_cache(model, ids, 4, capacity=1024)
    assert delta == cache.nbytes() == 1024 * per_token


@cuda
def test_nvml_sees_a_one_gib_allocation():
    torch.cuda.synchronize()
    before = read_nvml().devices[torch.cuda.current_device()].memory_used_bytes
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = read_nvml().devices[torch.cuda.current_device()].memory_used_bytes
    del block
    assert after - before >= 2**30


@cuda
def test_latency_timed_with_cuda_events():
    from melt_bench.scenarios.latency import LatencyPoint
    from melt_bench.scenarios.measure_latency import measure_latency_point

    point = LatencyPoint("latency", "ouro-tiny", 4, 64, 2, "decode", 8, "bfloat16", "cuda:0", warmup=1, timed_runs=3)
    row = measure_latency_point(point)
    assert row["status"] == "ok", row["error"]
    m = row["metrics"]
    assert m["timer"] == "cuda events" and 0 < m["decode_ms_per_token_mean_min"] <= m["decode_ms_per_token_mean"]


@cuda
def test_capacity_budget_caps_the_cuda_allocator():
    from melt_bench.running.launcher import run_in_child
    from melt_bench.scenarios.measure_memory import measure_memory_point
    from melt_bench.scenarios.memory import MemoryPoint

    point = MemoryPoint("memory", "ouro-1.4b", 1, 128, 1, "decode", 4, "bfloat16", "cuda:0")
    # the weights alone are 2.7 GiB; in a child, so the cap does not stay on this process
    over = run_in_child(measure_memory_point, (point, 10.0, None, 2 * 2**30), 300).value
    fits = run_in_child(measure_memory_point, (point, 10.0, None, 8 * 2**30), 300).value
    assert over["status"] == "oom" and fits["status"] == "ok"
    assert fits["metrics"]["cuda_max_allocated_bytes"] <= 8 * 2**30


@cuda
def test_convert_on_cuda_in_bf16_and_checkpointing_lowers_the_peak(tmp_path):
    import json
    from pathlib import Path

    from melt_bench.training.convert import ConvertConfig, run_convert

    data = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"
    peaks = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        run_convert(ConvertConfig(source="ouro-tiny", out=str(out), data=str(data), chunk_size=64, transition_steps=1,
                                  distill_steps=2, batch_size=8, seq_len=384, device="cuda", dtype="bfloat16",
                                  checkpoint_every=10, gradient_checkpointing=checkpointing), progress=False)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert all(row["loss"] == row["loss"] and row["step_s"] > 0 for row in log)  # finite, timed
        peaks[checkpointing] = max(row["cuda_peak_allocated_bytes"] for row in log)
    assert peaks[True] < peaks[False]


@cuda
@pytest.mark.parametrize("model", ["ouro-tiny", "melt-tiny"])
def test_compiled_engine_with_cuda_graphs_decodes_the_eager_tokens(model):
    from dataclasses import replace

    from melt_bench.scenarios.latency import LatencyPoint
    from melt_bench.scenarios.measure_latency import measure_latency_point

    point = LatencyPoint("latency", model, 4, 64, 2, "decode", 8, "float32", "cuda:0", warmup=2, timed_runs=3,
                         engine="compiled")
    compiled = measure_latency_point(point)
    eager = measure_latency_point(replace(point, engine="eager"))
    assert compiled["status"] == eager["status"] == "ok", (compiled["error"], eager["error"])
    c, e = compiled["metrics"], eager["metrics"]
    assert "CUDA graphs" in c["engine_description"]
    assert c["output_digest"] == e["output_digest"]
    assert 0 < c["decode_mbu"] < 1.5 and c["device_bandwidth_bytes_per_s"] > 1e11  # a GPU copies > 100 GB/s
    if c["energy_source"].startswith("unavailable"):
        assert c["energy_decode_j_per_token"] is None
    else:
        assert c["energy_decode_j_per_token"] is not None and c["energy_prefill_window_s"] >= 1.0


@cuda
def test_the_gpu_pool_pins_every_point_to_its_gpu(tmp_path):
    """--gpus all: every row ran on one of the machine's GPUs, and NVML's figures are that GPU's."""
    from melt_bench.cli import main
    from melt_bench.running.results import ResultsStore

    out = tmp_path / "m.jsonl"
    assert main(["memory", "--models", "ouro-tiny,melt-tiny", "--loops", "1,2", "--seq-lens", "64", "--batch-sizes",
                 "1", "--new-tokens", "4", "--dtype", "float32", "--gpus", "all", "--allow-busy-gpus",
                 "--no-progress", "--out", str(out)]) == 0
    rows = ResultsStore(out).read()
    gpus = {str(index) for index in range(torch.cuda.device_count())}
    assert len(rows) == 4 and all(row.status == "ok" and row.metrics["gpu"] in gpus for row in rows)
    assert all(row.metrics["nvml_device_used_peak_bytes"] > 0 for row in rows)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("layout", [[], ["--fsdp"]])
def test_convert_over_two_gpus_equals_one_gpu(tmp_path, layout):
    """DDP and FSDP over NCCL: the parameters of one GPU with the same global batch, and every
    rank's allocator peak in the log."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from melt_bench.models import load_model

    data = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"
    args = ["convert", "--from", "ouro-tiny", "--data", str(data), "--device", "cuda", "--no-progress",
            "--chunk-size", "16", "--transition-steps", "2", "--distill-steps", "2", "--batch-size", "2",
            "--seq-len", "40", "--tokens-per-step", "160", "--lr-base", "1e-3", "--lr-gate", "1e-2"]
    for ranks, out in ((1, "one"), (2, "two")):
        launch = ["torch.distributed.run", "--nproc_per_node", "2", "-m"] if ranks == 2 else []
        command = [sys.executable, "-m", *launch, "melt_bench", *args, *(layout if ranks == 2 else []), "--out",
                   str(tmp_path / out)]
        done = subprocess.run(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one = load_model("melt-tiny", weights=tmp_path / "one" / "model").state_dict()
    two = load_model("melt-tiny", weights=tmp_path / "two" / "model").state_dict()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    log = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert all(len(row["cuda_peak_allocated_bytes_per_rank"]) == 2 for row in log)
