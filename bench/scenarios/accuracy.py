"""`melt-bench accuracy`: its options, its point, its end-of-sweep table, and the way from its
flags to its points: the sweeps' option rules (running/sweep_options.py) plus what lm-eval needs
checked before anything runs (its tasks, their local data). The evaluation itself, in each
point's child, is scenarios/measure_accuracy.py. Torch-free."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from melt_bench.reporting.summary_tables import Column, TableSpec, bytes_cell
from melt_bench.running import hub
from melt_bench.running.ranges import RangeError
from melt_bench.running.sweep_options import (
    CPU_DEFAULTS,
    CUDA_DEFAULTS,
    OptionError,
    SweepFlags,
    check_family_support,
    check_packed_caches,
    check_weights,
    resolve_decode_reads,
    resolve_device,
    resolve_kv_policies,
    resolve_kv_quants,
    validate_spec,
)
from melt_bench.running.sweep_plan import SweepSpec, as_int_list, as_name_list, variant_label
from melt_bench.units import format_bytes


@dataclass
class AccuracyFlags(SweepFlags):
    """accuracy's options besides the sweeps' (None: not given)."""

    tasks: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int | None = None
    max_gen_toks: int | None = None
    data_dir: str | None = None
    exit_mode: str | None = None
    kv_probe_tokens: int | None = None
    score_continuation_as: str | None = None
    generate_with: str | None = None


@dataclass(frozen=True)
class AccuracyPoint:
    """One evaluation run: a model at a loop count and exit mode on one task."""

    model: str
    loops: int
    task: str
    exit_mode: str = "last"
    num_fewshot: int | None = None  # None = the task's default
    limit: int | None = None
    batch_size: int = 1
    max_gen_toks: int | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    weights: str | None = None
    data_dir: str | None = None
    kv_policy: str | None = None  # Ouro-family models: a training-free KV policy (None = the model's own)
    decode_reads: str | None = None  # MELT models: "final" or "chunk" (None = the config's)
    score_continuation_as: str = "chunk"  # log-likelihood tasks: "chunk" (one forward) | "decode"
    kv_quant: str | None = None  # any model: cached rows packed to "int8" / "int4" (None = full precision)
    kv_probe_tokens: int | None = None  # the length KV bytes per token are measured at (None = KV_PROBE_TOKENS)
    # generation tasks: "continuous-batching" (the decode engine, --batch-size slots) | "generate"
    generate_with: str = "continuous-batching"

    @property
    def point_id(self) -> str:
        fields = asdict(self)
        for name, default in (("kv_policy", None), ("decode_reads", None), ("score_continuation_as", "chunk"),
                              ("kv_quant", None), ("kv_probe_tokens", None),
                              # rows from before #34 generated through generate(), the same text (tested)
                              ("generate_with", "continuous-batching")):
            if fields[name] == default:  # left out at its default, so ids from before the field stay
                del fields[name]
        blob = json.dumps({"command": "accuracy", **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def label(self) -> str:
        """What the progress bar shows of the point."""
        return f"{variant_label(self)} loops={self.loops} {self.task} exit={self.exit_mode}"

    def to_dict(self) -> dict:
        return {"command": "accuracy", **asdict(self)}


SUMMARY = TableSpec(
    "accuracy", "accuracy",
    [Column("", lambda m: f"{m['value']:.4f} ± {m['stderr'] or 0:.4f}" if "value" in m else "-"),
     Column(" peak", bytes_cell("peak_bytes")),
     Column(" KV/token", lambda m: format_bytes(m.get("kv_bytes_per_token")))],
    "value", "score", ("task", "metric", "filter", "exit_mode", "num_fewshot", "limit"),
)


def check_accuracy_flags(flags: AccuracyFlags) -> AccuracyFlags:
    """Everything accuracy can refuse before torch and lm-eval load: the lists, the numbers, the
    exit mode, the scoring, --data-dir and its task files, --weights. Returns the flags with
    --data-dir made absolute."""
    from melt_bench.evaluation.exit_modes import CONTINUATION_SCORING, GENERATE_WITH, exit_kwargs
    from melt_bench.evaluation.task_files import checked_task_files
    from melt_bench.running.sweep_options import check_names

    try:
        tasks = as_name_list("gsm8k" if flags.tasks is None else flags.tasks, "--tasks")
        for key in ("loops", "models"):
            if getattr(flags, key) is not None:
                (as_int_list if key == "loops" else as_name_list)(getattr(flags, key), f"--{key}")
    except RangeError as exc:
        raise OptionError(str(exc)) from exc
    check_names(flags.given())
    try:
        exit_kwargs(flags.exit_mode or "last")
    except ValueError as exc:
        raise OptionError(f"--exit-mode: {exc}") from exc
    for name, least in (("num_fewshot", 0), ("limit", 1), ("max_gen_toks", 1), ("batch_size", 1),
                        ("kv_probe_tokens", 1)):
        value = getattr(flags, name)
        if value is not None and value < least:
            raise OptionError(f"--{name.replace('_', '-')}: {value} must be at least {least}")
    if flags.generate_with is not None and flags.generate_with not in GENERATE_WITH:
        raise OptionError(f"--generate-with: {flags.generate_with!r} is not one of {', '.join(GENERATE_WITH)}")
    scoring = flags.score_continuation_as
    if scoring is not None and scoring not in CONTINUATION_SCORING:
        raise OptionError(f"--score-continuation-as: {scoring!r} is not one of {', '.join(CONTINUATION_SCORING)}")
    data_dir = flags.data_dir
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise OptionError(f"--data-dir {data_dir}: no such directory")
        data_dir = str(path.resolve())
        for task in tasks:
            try:
                checked_task_files(path, task)
            except (FileNotFoundError, ValueError) as exc:
                raise OptionError(str(exc)) from exc
    check_weights(flags.weights)
    return replace(flags, data_dir=data_dir)


def resolve_accuracy(flags: AccuracyFlags) -> tuple[list, list[str]]:
    """AccuracyPoints from the accuracy command's flags (None = not given), and notices."""
    from melt_bench.evaluation.lm_eval_adapter import chunk_scoring_problem, default_scoring

    flags = check_accuracy_flags(flags)
    notices = []
    device = resolve_device(flags.device or "auto")
    defaults = CUDA_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    if flags.models is None and device == "cpu":
        notices.append("no CUDA device: using the tiny CPU presets ouro-tiny,melt-tiny (pass --models to choose)")
    models = as_name_list(flags.models or defaults["models"], "--models")
    loops = as_int_list(flags.loops or "1,2,4", "--loops")
    tasks = as_name_list("gsm8k" if flags.tasks is None else flags.tasks, "--tasks")
    dtype = flags.dtype or defaults["dtype"]
    spec = SweepSpec("accuracy", models, loops, [1], [1], dtype=dtype, device=device)
    validate_spec(spec)
    weights = check_weights(flags.weights)
    spec.kv_policies = resolve_kv_policies(flags.kv_policy, models)
    spec.decode_reads = resolve_decode_reads(flags.decode_reads, models)
    kv_quants = resolve_kv_quants(flags.kv_quant)
    probe, scoring = flags.kv_probe_tokens, flags.score_continuation_as
    points = [
        AccuracyPoint(model, loop, task, flags.exit_mode or "last", flags.num_fewshot,
                      flags.limit, flags.batch_size or 1, flags.max_gen_toks, dtype,
                      device, weights, flags.data_dir, kv_policy=policy, decode_reads=reads,
                      score_continuation_as=scoring or default_scoring(policy, loop, quant), kv_quant=quant,
                      # a length matters only to packed caches: other points keep their ids
                      kv_probe_tokens=probe if policy == "flashloop" or quant else None,
                      generate_with=flags.generate_with or "continuous-batching")
        for model in models for policy in spec.policies_for(model) for reads in spec.decode_reads_for(model)
        for quant in kv_quants for task in tasks for loop in loops
    ]
    check_family_support(points)
    check_packed_caches(points, "accuracy")
    for point in points:
        problem = chunk_scoring_problem(point.kv_policy, point.loops, point.kv_quant)
        if point.score_continuation_as == "chunk" and problem:
            raise OptionError(f"--score-continuation-as: {problem}")
    return points, notices


def check_tasks(tasks: list[str], data_dir: str | None, scratch: Path):
    """Every task must be one lm-eval knows; with --data-dir, its local files must be there and
    well formed (their task YAMLs are written into `scratch`). Checked before anything runs or
    any results file is opened. Returns the lm-eval TaskManager the run evaluates with."""
    from lm_eval.tasks import TaskManager

    from melt_bench.evaluation.lm_eval_adapter import local_task_dir

    if data_dir is None and (problem := hub.hub_problem()):  # before lm-eval indexes its tasks (10 s)
        raise OptionError(f"--tasks {','.join(tasks)}: task data come from the hub and {problem}; pass "
                          "--data-dir DIR with DIR/TASK/{train,test}.jsonl (e.g. ../shared/data), or set "
                          "HF_DATASETS_OFFLINE=1 if they are cached")
    include = None
    if data_dir is not None:
        try:
            include = [str(local_task_dir(Path(data_dir), tasks, scratch))]
        except (FileNotFoundError, ValueError) as exc:
            raise OptionError(str(exc)) from exc
    # With --data-dir every task is one of ours (its YAML names lm-eval's by path): indexing
    # lm-eval's 14,000 built-in tasks as well took 10 s, and a parent does it once per run.
    manager = TaskManager(include_path=include, include_defaults=include is None)
    unknown = [task for task in tasks if task not in set(manager.all_tasks)]
    if unknown:
        raise OptionError(f"--tasks: lm-eval knows no task {', '.join(repr(t) for t in unknown)}")
    return manager
