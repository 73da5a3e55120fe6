r"""llama.cpp's decode time on this machine at a preset's shape, unrolled: the reference that
issue #33's goal is set against, measured where melt-bench's own figures are.

The llama.cpp that pip can fetch has no Ouro architecture, so this writes the preset *unrolled*:
a Llama with `layers x loops` blocks of the same shape (hidden, heads, head dim, intermediate,
vocabulary, untied head). One decode token of it reads exactly the weight and K/V bytes of the
looped model at those loops (each loop re-reads the shared layers; each loop keeps its own
cache), and does the same FLOPs; only the per-loop norms and exit gate (~1 K elements a loop)
are missing. Weights are random (seeded), so this times decode and says nothing of tokens.

Needs a llama.cpp checkout (for its `gguf-py`) and its `llama-bench` binary, e.g. from the
sources inside the `llama-cpp-python` sdist. llama-bench takes no f32 K/V cache (`-ctk f32`),
which the fp32 row needs (KV in the weights' type, as ours): add `f32` to its
`ggml_type_from_name` (one line: the sed below) before building.

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcp && tar xzf /tmp/lcp/*.tar.gz -C /tmp/lcp
    cd /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp
    sed -i '/^static ggml_type ggml_type_from_name/a\    if (s == "f32") return GGML_TYPE_F32;' \
        tools/llama-bench/llama-bench.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build --target llama-bench -j2
    python benchmarks/llama_cpp_reference.py --llama-cpp /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp

Prints, per dtype, decode ms/token (llama-bench's `tg` over `-n` tokens after a `-d`-token
context, one run per repeat) with the min and max over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16"}


@dataclass
class ReferenceTiming:
    dtype: str
    ms_per_token: float  # median over the repeats
    ms_min: float
    ms_max: float
    repeats: int
    build: str  # llama.cpp's commit and build number, as llama-bench reports them
    flash_attention: bool  # the faster of llama.cpp's two attention paths at this shape

    def label(self) -> str:
        attention = "flash attention" if self.flash_attention else "no flash attention"
        return f"llama.cpp {self.build}, unrolled Llama, {attention}, measured here"


def spm_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary llama.cpp loads: unk, bos, eos, the 256 byte tokens it
    looks up (newline among them), then placeholders. Types: 1 normal, 2 unknown, 3 control, 6 byte."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"t{i}" for i in range(len(tokens), size)]
    types += [1] * (size - len(types))
    return tokens, [0.0] * size, types


def write_unrolled_gguf(path: Path, preset: str, loops: int, dtype: str, gguf_py: Path, seed: int = 0) -> int:
    """Writes `preset` unrolled to `layers x loops` Llama blocks as GGUF; returns the parameter count."""
    sys.path.insert(0, str(gguf_py))
    import gguf
    import numpy as np
    import torch

    from melt_bench.models.preset_table import get_preset

    config = get_preset(preset).config()
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    blocks = config.num_hidden_layers * loops
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    quant = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[dtype])

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(h)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_BF16)
    tokens, scores, types = spm_vocab(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    count = 0

    def add(name: str, *shape: int, norm: bool = False) -> None:
        nonlocal count
        count += int(np.prod(shape))
        if norm:  # llama.cpp keeps norms in f32 whatever the file type
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
            return
        weight = (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)
        if dtype == "float32":
            writer.add_tensor(name, weight.numpy())
        else:  # numpy has no bfloat16: hand gguf the raw 16-bit words and say what they are
            writer.add_tensor(name, weight.view(torch.int16).numpy().view(np.uint16), raw_dtype=quant)

    add("token_embd.weight", config.vocab_size, h)
    for block in range(blocks):  # (out, in) rows, as GGUF stores a Linear
        add(f"blk.{block}.attn_norm.weight", h, norm=True)
        add(f"blk.{block}.attn_q.weight", heads * d, h)
        add(f"blk.{block}.attn_k.weight", kv_heads * d, h)
        add(f"blk.{block}.attn_v.weight", kv_heads * d, h)
        add(f"blk.{block}.attn_output.weight", h, heads * d)
        add(f"blk.{block}.ffn_norm.weight", h, norm=True)
        add(f"blk.{block}.ffn_gate.weight", inter, h)
        add(f"blk.{block}.ffn_up.weight", inter, h)
        add(f"blk.{block}.ffn_down.weight", h, inter)
    add("output_norm.weight", h, norm=True)
    add("output.weight", config.vocab_size, h)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def time_decode(llama_bench: Path, model: Path, dtype: str, context: int, new_tokens: int, threads: int,
                repeats: int) -> ReferenceTiming:
    """llama-bench's token generation: `new_tokens` tokens after a `context`-token prompt (-d),
    KV cache in the weights' type, `repeats` runs, with and without flash attention; the faster
    is llama.cpp's figure (on one AVX2 thread with an f32 cache at 512 rows, flash attention
    was 1.6x slower: 62 vs 38 ms/token)."""
    kv_type = "f32" if dtype == "float32" else "bf16"
    command = [str(llama_bench), "-m", str(model), "-p", "0", "-n", str(new_tokens), "-d", str(context),
               "-t", str(threads), "-r", str(repeats), "-ctk", kv_type, "-ctv", kv_type, "-fa", "0,1", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"llama-bench exited {done.returncode}: {last}")
    timings = []
    for result in json.loads(done.stdout):
        per_run_ms = [ns / 1e6 / new_tokens for ns in result["samples_ns"]]
        build = f"{result.get('build_commit', '?')} (build {result.get('build_number', '?')})"
        timings.append(ReferenceTiming(dtype, statistics.median_low(per_run_ms), min(per_run_ms), max(per_run_ms),
                                       len(per_run_ms), build, bool(result.get("flash_attn"))))
    return min(timings, key=lambda timing: timing.ms_per_token)


def measure_reference(llama_cpp: Path, preset: str, loops: int, dtypes: list[str], context: int, new_tokens: int,
                      threads: int, repeats: int) -> dict[str, ReferenceTiming]:
    llama_bench = llama_cpp / "build" / "bin" / "llama-bench"
    if not llama_bench.is_file():
        raise FileNotFoundError(f"no llama-bench at {llama_bench}: build it first (see this script's docstring)")
    timings = {}
    with tempfile.TemporaryDirectory(prefix="llama-cpp-reference-") as scratch:
        for dtype in dtypes:
            model = Path(scratch) / f"{preset}-unrolled-{loops}-{dtype}.gguf"
            write_unrolled_gguf(model, preset, loops, dtype, llama_cpp / "gguf-py")
            timings[dtype] = time_decode(llama_bench, model, dtype, context, new_tokens, threads, repeats)
            model.unlink()
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp checkout with build/bin/llama-bench")
    parser.add_argument("--preset", default="ouro-mid")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seq-len", type=int, default=512, help="context before the timed tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    timings = measure_reference(args.llama_cpp, args.preset, args.loops, args.dtypes.split(","), args.seq_len,
                                args.new_tokens, args.threads, args.repeats)
    print(f"{args.preset} unrolled ({args.loops} loops), {args.seq_len}-token context, {args.new_tokens} new tokens, "
          f"{args.threads} thread(s)")
    for timing in timings.values():
        print(f"{timing.dtype}: {timing.ms_per_token:.1f} ms/token (min {timing.ms_min:.1f}, max {timing.ms_max:.1f}, "
              f"{timing.repeats} runs; {timing.label()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
