"""Suites: YAML files naming a sweep's models, lists, phase, dtype, new tokens and repeats.
`--suite` takes a path or the name of a shipped suite (suites/NAME.yaml)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SUITE_KEYS = {
    "name", "description", "models", "loops", "seq_lens", "batch_sizes", "phase", "new_tokens",
    "dtype", "device", "weights", "repeats", "point_timeout", "kv_policy", "decode_reads",
}


class SuiteError(ValueError):
    pass


def shipped_suites() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("melt_bench.suites").iterdir()
                  if p.name.endswith(".yaml"))


def load_suite(name_or_path: str) -> dict:
    """The suite's settings as a dict of option name -> value (lists still unparsed)."""
    import yaml  # here, not at the command line's start (~20 ms)

    path = Path(name_or_path)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SuiteError(f"--suite {name_or_path}: not a readable YAML text file ({exc})") from exc
    else:
        shipped = resources.files("melt_bench.suites") / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise SuiteError(f"--suite: no file {name_or_path!r} and no shipped suite of that name "
                             f"(shipped: {', '.join(shipped_suites())})")
        text = shipped.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SuiteError(f"--suite {name_or_path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise SuiteError(f"--suite {name_or_path}: expected a mapping of settings")
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"--suite {name_or_path}: unknown setting(s) {', '.join(unknown)}")
    for key, value in data.items():
        if problem := _setting_problem(key, value):
            raise SuiteError(f"--suite {name_or_path}: {key}: {problem}")
    return data


# Settings that are one number; the lists (loops, seq_lens, ...) have their own grammar (ranges.py).
_COUNTS, _SECONDS = ("repeats", "new_tokens"), ("point_timeout",)


def _setting_problem(key: str, value: object) -> str | None:
    """Why a suite's scalar setting cannot be used as its flag would be, or None."""
    from melt_bench.units import number_problem

    if key in _COUNTS + _SECONDS:
        kinds = (int,) if key in _COUNTS else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"{value!r} is not {'an integer' if key in _COUNTS else 'a number of seconds'}"
        return number_problem(value)
    if key not in ("models", "loops", "seq_lens", "batch_sizes", "kv_policy", "decode_reads") and \
            not isinstance(value, str):
        return f"{value!r} is not a text value"
    return None
