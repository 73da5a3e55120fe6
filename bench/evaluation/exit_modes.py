"""--exit-mode (which loop's output a token is read from, as the official Ouro keywords say it)
and --score-continuation-as. Plain Python, so a bad mode is refused before torch and lm-eval load."""

from __future__ import annotations

EXIT_MODES = ("last", "step:K", "threshold:P", "expected", "official")
# How a log-likelihood request's continuation is scored: "chunk" in one forward over context +
# continuation (for MELT: the continuation sits in the context's last chunk, reading its same-loop
# rows), "decode" token by token as generation would compute it (the context prefilled as
# generation prefills it, then each continuation token a chunk of its own reading the rows the KV
# policy kept, unless MELT's decode_reads="chunk" continues the grid). The two are equal for
# per-loop Ouro (a per-token cache is exact) and for chunk-grid MELT. Under a training-free policy
# that shares rows across loops (last-loop, mean, ...), one forward reads every loop's own rows,
# i.e. computes per-loop Ouro, not the policy: "chunk" is refused there (`chunk_scoring_problem`).
GENERATE_WITH = ("continuous-batching", "generate")  # how generate_until runs (batched_generation.py)
CONTINUATION_SCORING = ("chunk", "decode")


def exit_kwargs(mode: str) -> dict:
    """'last' -> {}; 'step:2' -> exit after loop 2 (exit_at_step=1); 'threshold:0.9';
    'expected' (exit-probability-weighted logits); 'official' (the released code's default rule,
    early_exit_threshold in the model's dtype). The official Ouro keyword names."""
    if mode == "last":
        return {}
    if mode == "expected":
        return {"use_weighted_exit": True}
    if mode == "official":
        return {"official_exit": True}
    kind, _, value = mode.partition(":")
    try:
        if kind == "step" and int(value) >= 1:
            return {"exit_at_step": int(value) - 1}
        if kind == "threshold" and 0 < float(value) <= 1:
            return {"exit_threshold": float(value)}
    except ValueError:
        pass
    raise ValueError(f"exit mode {mode!r} is not one of {', '.join(EXIT_MODES)} (K >= 1, 0 < P <= 1)")
