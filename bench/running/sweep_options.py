"""From command-line flags and an optional suite to a validated `SweepSpec`: suite values first,
explicit flags win, then machine-dependent defaults. Every problem is a one-line `OptionError`."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from melt_bench.models.names import (
    DECODE_READS,
    HUGINN_FROM_OURO,
    HUGINN_KV_POLICIES,
    KV_QUANT,
    MAX_LOOPS,
    UnknownKVPolicyError,
    is_huginn_kv_policy,
    parse_kv_policy,
)
from melt_bench.models.preset_table import UnknownPresetError, get_preset, is_huginn, is_melt
from melt_bench.running import hub
from melt_bench.running.ranges import RangeError
from melt_bench.running.suite_loader import SuiteError, load_suite
from melt_bench.running.sweep_plan import PHASES, SweepSpec, as_int_list, as_name_list
from melt_bench.units import check_dtype

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

CUDA_DEFAULTS = {"models": "ouro-1.4b,melt-1.4b", "seq_lens": "2048", "batch_sizes": "1", "dtype": "bfloat16"}
# Sized so 1..16 loops, each point measured twice, take under a minute on 2 cores: 4 x 1,024 cached
# tokens, so the KV cache grows 2 MiB a loop (far above the RSS spread) while attention, quadratic
# in the length, stays cheap; float32 because bf16 matmuls are slow on most CPUs.
CPU_DEFAULTS = {"models": "ouro-tiny,melt-tiny", "seq_lens": "1024", "batch_sizes": "4", "dtype": "float32"}
# A CPU memory figure is a process's resident set: two fresh processes per point show its spread.
# Eight decoded tokens: the peak is the prefill's (the cache is allocated whole before it), the
# steps after it show the cache does not grow, and 32 of them took a quarter of the job's time.
CPU_MEMORY_DEFAULTS = {"repeats": 2, "new_tokens": 8}
# serve: Ouro's trained loop count, and the prompts serving benchmarks send (1,024 tokens on a GPU).
SERVE_DEFAULTS = {"cuda": {"loops": "4", "seq_lens": "1024"}, "cpu": {"loops": "4", "seq_lens": "128"}}
COMMON_DEFAULTS = {"loops": "1..16", "phase": "decode", "new_tokens": 32, "repeats": 1, "point_timeout": 600.0}


class OptionError(ValueError):
    pass


@dataclass
class SweepFlags:
    """The sweep options as the command line gave them (None: not given, so a suite or a machine
    default decides). Typed: an option the resolver does not know is an error where it is built."""

    models: str | None = None
    loops: str | None = None
    seq_lens: str | None = None
    batch_sizes: str | None = None
    phase: str | None = None
    new_tokens: int | None = None
    dtype: str | None = None
    device: str | None = None
    weights: str | None = None
    repeats: int | None = None
    point_timeout: float | None = None
    kv_policy: str | None = None
    decode_reads: str | None = None
    kv_quant: str | None = None

    def given(self) -> dict:
        """The options given, by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass
class ResolvedSweep:
    spec: SweepSpec
    point_timeout: float
    notices: list[str]


def check_device_name(text: str) -> None:
    """OptionError unless `text` reads as auto, cpu or cuda[:N] (whether it exists: resolve_device)."""
    if not re.fullmatch(r"auto|cpu|cuda(?::\d+)?", text):
        raise OptionError(f"--device: {text!r} is not auto, cpu or cuda[:N]")


def check_names(flags: dict) -> None:
    """Check the names a user gave (models, dtype, phase, device, KV policies, decode reads, KV
    quant) and the loop limit, before torch is imported: a typo is refused at once, not after
    seconds of imports. What needs the resolved machine (defaults, model families) comes later."""
    try:
        if flags.get("models") is not None:
            _check_models(as_name_list(flags["models"], "--models"))
        if flags.get("loops") is not None:
            _check_loops(as_int_list(flags["loops"], "--loops"))
        if flags.get("kv_policy") is not None:
            for name in as_name_list(flags["kv_policy"], "--kv-policy"):
                parse_kv_policy(name)
    except RangeError as exc:
        raise OptionError(str(exc)) from exc
    except UnknownKVPolicyError as exc:
        raise OptionError(f"--kv-policy: {exc}") from exc
    if flags.get("phase") is not None:
        _check_phase(flags["phase"])
    if flags.get("dtype") is not None:
        _check_dtype(flags["dtype"])
    if flags.get("device") is not None:
        check_device_name(flags["device"])
    for key, allowed in (("decode_reads", DECODE_READS), ("kv_quant", KV_QUANT)):
        if flags.get(key) is not None:
            _choices(flags[key], f"--{key.replace('_', '-')}", allowed)


def _check_models(models: list[str]) -> None:
    for model in models:
        try:
            get_preset(model)
        except UnknownPresetError as exc:
            raise OptionError(f"--models: {exc}") from exc


def _check_loops(loops: list[int]) -> None:
    if max(loops) > MAX_LOOPS:
        raise OptionError(f"--loops: {max(loops)} is above the maximum of {MAX_LOOPS}")


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise OptionError(f"--phase: {phase!r} is not one of {', '.join(PHASES)}")


def _check_dtype(dtype: str) -> None:
    try:
        check_dtype(dtype)
    except ValueError as exc:
        raise OptionError(f"--dtype: {exc}") from exc


def resolve_device(text: str) -> str:
    """'auto' -> 'cuda:0' when CUDA is there, else 'cpu'; 'cuda' -> 'cuda:0'; checks it exists."""
    check_device_name(text)
    import torch

    if text == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not torch.cuda.is_available():
        raise OptionError(f"--device {text}: CUDA is not available on this machine")
    index = int(match[1] or 0)
    if index >= torch.cuda.device_count():
        raise OptionError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


def check_tokenizer(tokenizer: str | None) -> str | None:
    """--tokenizer: a local directory (made absolute) or a reachable hub id, checked before any
    point runs (a bad one once wrote an error row per point and exited 0)."""
    if tokenizer is None:
        return None
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise OptionError(f"--tokenizer {tokenizer}: no tokenizer files in that directory (none of "
                              f"{', '.join(TOKENIZER_FILES)})")
        return str(path.resolve())
    if path.exists():
        raise OptionError(f"--tokenizer {tokenizer}: a file, not a tokenizer directory")
    if _HUB_ID.match(tokenizer) and not tokenizer.startswith("."):
        if problem := hub.hub_problem(tokenizer):
            raise OptionError(f"--tokenizer {tokenizer}: {problem}; pass a local tokenizer directory instead")
        return tokenizer
    raise OptionError(f"--tokenizer {tokenizer}: no such directory (and not a hub id like org/name)")


def check_weights(weights: str | None, option: str = "--weights") -> str | None:
    """A local checkpoint directory (made absolute, as children may run elsewhere) or a hub id."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise OptionError(f"{option} {weights}: no config.json in that directory")
        if problem := checkpoint_config_problem(path / "config.json"):
            raise OptionError(f"{option} {weights}: {problem}")
        return str(path.resolve())
    if _HUB_ID.match(weights) and not weights.startswith("."):
        problem = hub.hub_problem(weights)
        if problem:
            raise OptionError(f"{option} {weights}: {problem}; pass a local checkpoint directory instead")
        return weights
    raise OptionError(f"{option} {weights}: no such directory (and not a hub id like org/name)")


# What AutoTokenizer reads a tokenizer from (any one is enough for one of its classes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
CHECKPOINT_FAMILIES = ("ouro", "melt")  # config.json's model_type, as our models save and load it


def checkpoint_config_problem(config: Path) -> str | None:
    """Why a checkpoint's config.json cannot load as one of our models (before any point runs), or None."""
    import json

    try:
        data = json.loads(config.read_bytes())
    except (OSError, ValueError) as exc:
        return f"{config.name} is not JSON ({str(exc).splitlines()[0][:80]})"
    if not isinstance(data, dict) or data.get("model_type") not in CHECKPOINT_FAMILIES:
        found = data.get("model_type") if isinstance(data, dict) else None
        return (f"{config.name} names model_type {found!r}, not one of {', '.join(CHECKPOINT_FAMILIES)}"
                if found is not None else f"{config.name} has no model_type (an Ouro or MELT checkpoint's says "
                "\"ouro\" or \"melt\")")
    return None


def resolve_sweep(command: str, flags: SweepFlags, suite: str | None) -> ResolvedSweep:
    """The sweep of `flags` over `suite`'s settings (flags win), with the machine's defaults."""
    try:
        settings = load_suite(suite) if suite else {}
    except SuiteError as exc:
        raise OptionError(str(exc)) from exc
    settings = {key: value for key, value in settings.items() if key not in ("name", "description")}
    settings.update(flags.given())
    notices = []
    device = resolve_device(str(settings.get("device", "auto")))
    machine_defaults = CUDA_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    if command == "memory" and device == "cpu":
        machine_defaults = {**machine_defaults, **CPU_MEMORY_DEFAULTS}
    if command == "serve":
        machine_defaults = {**machine_defaults, **SERVE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]}
    if "models" not in settings and device == "cpu":
        notices.append("no CUDA device: using the tiny CPU presets ouro-tiny,melt-tiny (pass --models to choose)")
    settings = {**COMMON_DEFAULTS, **machine_defaults, **settings}
    try:
        spec = SweepSpec(
            command=command,
            models=as_name_list(settings["models"], "--models"),
            loops=as_int_list(settings["loops"], "--loops"),
            seq_lens=as_int_list(settings["seq_lens"], "--seq-lens"),
            batch_sizes=as_int_list(settings["batch_sizes"], "--batch-sizes"),
            phase=str(settings["phase"]),
            new_tokens=int(settings["new_tokens"]),
            dtype=str(settings["dtype"]),
            device=device,
            weights=check_weights(settings.get("weights")),
            repeats=int(settings["repeats"]),
        )
    except RangeError as exc:
        raise OptionError(str(exc)) from exc
    validate_spec(spec)
    spec.kv_policies = resolve_kv_policies(settings.get("kv_policy"), spec.models)
    spec.decode_reads = resolve_decode_reads(settings.get("decode_reads"), spec.models)
    spec.kv_quants = resolve_kv_quants(settings.get("kv_quant"))
    if spec.phase == "prefill":
        spec.new_tokens = 0  # irrelevant to a prefill: keep point ids independent of it
    timeout = float(settings["point_timeout"])
    if timeout <= 0:
        raise OptionError(f"--point-timeout: {timeout:g} must be positive")
    return ResolvedSweep(spec, timeout, notices)


def resolve_kv_policies(value: object, models: list[str]) -> list[str | None]:
    """--kv-policy's names made canonical ('modulo:2', ...), or [None] (each model's own). They
    apply to Ouro-family models; a list of MELT models only is refused (MELT keeps its gate)."""
    if value is None:
        return [None]
    try:
        names = [parse_kv_policy(name) for name in as_name_list(value, "--kv-policy")]
    except RangeError as exc:
        raise OptionError(str(exc)) from exc
    except UnknownKVPolicyError as exc:
        raise OptionError(f"--kv-policy: {exc}") from exc
    if "shared-gated" in names:
        raise OptionError("--kv-policy shared-gated is MELT's own policy, which needs its trained gate: "
                          "run a MELT model instead")
    if all(is_melt(model) for model in models):
        raise OptionError(f"--kv-policy {value}: {', '.join(models)} keep MELT's own gated policy; training-free "
                          "KV policies apply to Ouro-family models")
    huginn = [model for model in models if is_huginn(model)]
    for name in names:
        if is_huginn_kv_policy(name) and len(huginn) < len(models):
            raise OptionError(f"--kv-policy {name} is a Huginn cache lookup strategy: it applies to Huginn models "
                              f"only, not {', '.join(m for m in models if m not in huginn)}")
        if huginn and not is_huginn_kv_policy(name) and name not in HUGINN_FROM_OURO:
            raise OptionError(f"--kv-policy {name} has no Huginn counterpart ({', '.join(huginn)}): use "
                              f"{', '.join(HUGINN_KV_POLICIES)}, per-loop or last-loop")
    return list(dict.fromkeys(names))


def _choices(value: object, option: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma list of names, each one of `allowed`, without repeats; OptionError otherwise."""
    try:
        names = as_name_list(value, option)
    except RangeError as exc:
        raise OptionError(str(exc)) from exc
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise OptionError(f"{option}: {unknown[0]!r} is not one of {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def resolve_kv_quants(value: object) -> list[str | None]:
    """--kv-quant's modes (none, int8, int4; none as None, full precision), or [None]."""
    if value is None:
        return [None]
    return list(dict.fromkeys(None if mode == "none" else mode for mode in _choices(value, "--kv-quant", KV_QUANT)))


def check_family_support(points: list) -> None:
    """Refuse, before anything runs, what a Huginn point cannot run: packed caches, an exit rule
    (Huginn's adaptive exit is not built: every token runs every step) and positions past its
    RoPE table."""
    for point in points:
        if not is_huginn(point.model):
            continue
        if point.kv_quant is not None:
            raise OptionError(f"--kv-quant {point.kv_quant}: packed caches are built for Ouro-family models, not "
                              f"{point.model}")
        if getattr(point, "early_exit", None) is not None:
            raise OptionError(f"--early-exit on {point.model}: Huginn's adaptive exit is not built; it runs every step")
        if getattr(point, "exit_mode", "last") != "last":
            raise OptionError(f"--exit-mode {point.exit_mode} on {point.model}: Huginn's adaptive exit is not built; "
                              "it runs every step (--loops sets how many)")
        if not hasattr(point, "seq_len"):
            continue  # (accuracy: lm-eval truncates to max_length, the RoPE table's size)
        positions = get_preset(point.model).fields["block_size"]
        if point.seq_len + point.new_tokens > positions:
            raise OptionError(f"{point.model}: {point.seq_len} + {point.new_tokens} tokens are past its "
                              f"{positions}-position RoPE table (block_size)")


def check_packed_caches(points: list, command: str) -> None:
    """Refuse, before anything runs, the points a packed cache (--kv-quant, --kv-policy
    flashloop) cannot run: what FlashLoop 0.1.0 does not define (more than 4 loops, more than one
    sequence, a prompt in chunks, an exit rule), a quantised FlashLoop, chunk reads, and the
    static-shape decode engines (they read the cache's raw rows)."""
    from melt_bench.models.packed_cache import check_kv_quant

    for point in points:
        policy = point.kv_policy or ("shared-gated" if is_melt(point.model) else "per-loop")
        try:
            check_kv_quant(point.kv_quant, policy, point.decode_reads)
        except ValueError as exc:
            raise OptionError(f"--kv-quant: {exc}") from exc
        packed = policy == "flashloop" or point.kv_quant is not None
        what = "--kv-policy flashloop" if policy == "flashloop" else f"--kv-quant {point.kv_quant}"
        if policy == "flashloop" and point.loops > 4:
            raise OptionError(f"--kv-policy flashloop at {point.loops} loops: FlashLoop 0.1.0 defines loops 1-4")
        if policy == "flashloop" and command == "capacity":
            raise OptionError("--kv-policy flashloop on capacity: FlashLoop 0.1.0 holds one sequence, so its largest "
                              "batch is 1 by definition")
        if policy == "flashloop" and (getattr(point, "early_exit", None) is not None
                                      or getattr(point, "exit_mode", "last") != "last"):
            raise OptionError("--kv-policy flashloop with an exit rule: FlashLoop 0.1.0 computes every loop and "
                              "reads the last (use --early-exit off / --exit-mode last)")
        if policy == "flashloop" and (point.batch_size or 1) > 1:
            raise OptionError(f"--kv-policy flashloop at batch {point.batch_size}: FlashLoop 0.1.0 holds one sequence")
        if packed and getattr(point, "prefill_chunk", None) is not None:
            raise OptionError(f"{what} with --prefill-chunk: a packed cache packs the prompt as it commits; "
                              "prefill it in one piece")
        if packed and getattr(point, "static_cache", False):
            raise OptionError(f"{what} with --static-cache: a packed cache grows as it packs, it is never "
                              "allocated ahead")
        if packed and getattr(point, "timed", False) and point.engine != "forward":
            raise OptionError(f"{what} needs --engine forward: the {point.engine} engine reads the cache's raw rows "
                              "(static shapes), a packed cache dequantises on read")


def resolve_decode_reads(value: object, models: list[str]) -> list[str | None]:
    """--decode-reads' modes (final, chunk), or [None] (each MELT config's own). They apply to
    MELT models; a list without one is refused."""
    if value is None:
        return [None]
    modes = _choices(value, "--decode-reads", DECODE_READS)
    if not any(is_melt(model) for model in models):
        raise OptionError(f"--decode-reads {value}: {', '.join(models)} are not MELT models (decode_reads is how "
                          "MELT's decoded tokens read its shared cache)")
    return modes


def validate_spec(spec: SweepSpec) -> None:
    """The resolved sweep (suite values and defaults included), by the same rules as check_names."""
    _check_models(spec.models)
    _check_loops(spec.loops)
    _check_phase(spec.phase)
    if spec.phase != "prefill" and spec.new_tokens < 1:
        raise OptionError(f"--new-tokens: {spec.new_tokens} must be at least 1 for phase {spec.phase}")
    if spec.new_tokens < 0:
        raise OptionError(f"--new-tokens: {spec.new_tokens} must not be negative")
    if spec.repeats < 1:
        raise OptionError(f"--repeats: {spec.repeats} must be at least 1")
    _check_dtype(spec.dtype)
