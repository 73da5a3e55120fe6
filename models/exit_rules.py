"""When a looped model stops looping, per token: the exit distribution of its gate, the threshold
and official rules that read it after the fact, and EarlyStop, which really stops computing loops
(forward and the decode engine share it, and `fill_after_early_stop`, what the skipped loops
leave in the cache)."""

from __future__ import annotations

import torch

from .kv_cache import open_chunk_grid


class EarlyStop:
    """Stops the loop once every token's cumulative exit probability reaches `threshold` (the
    whole batch runs until its last token exits); each token's output is its hidden state at its
    own exit loop, as in the official threshold rule."""

    def __init__(self, threshold: float, loops: int) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"early-stop threshold must lie in (0, 1], got {threshold}")
        self.threshold, self.loops = threshold, loops
        self.remaining = self.exited = self.exit_steps = self.hidden = None

    def update(self, loop: int, gate_logit: torch.Tensor, x: torch.Tensor) -> bool:
        """Fold in loop `loop`'s gate; True when every token has exited."""
        last = loop >= self.loops - 1
        lam = torch.ones_like(gate_logit, dtype=torch.float32) if last else torch.sigmoid(gate_logit.float())
        if self.remaining is None:
            self.remaining = torch.ones_like(lam)
            self.exited = torch.zeros_like(lam, dtype=torch.bool)
            self.exit_steps = torch.full_like(lam, self.loops - 1, dtype=torch.long)
            self.hidden = x
        self.remaining = self.remaining * (1 - lam)
        newly = (1 - self.remaining >= self.threshold) & ~self.exited
        self.hidden = torch.where(newly[..., None], x, self.hidden)
        self.exit_steps = torch.where(newly, torch.full_like(self.exit_steps, loop), self.exit_steps)
        self.exited = self.exited | newly
        return bool(self.exited.all())


def exit_distribution(gate_logits: list[torch.Tensor]) -> torch.Tensor:
    """p_t = lambda_t * prod_{j<t}(1 - lambda_j), the last loop taking the remaining mass.
    Returns (batch, seq, loops)."""
    remaining = torch.ones_like(gate_logits[0], dtype=torch.float32)
    pdf = []
    for t, logit in enumerate(gate_logits):
        if t < len(gate_logits) - 1:
            lam = torch.sigmoid(logit.float())
            pdf.append(lam * remaining)
            remaining = remaining * (1 - lam)
        else:
            pdf.append(remaining)
    return torch.stack(pdf, dim=-1)


def threshold_exit_steps(pdf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per token, the first loop (0-based) whose cumulative exit probability reaches `threshold`;
    the last loop where none does."""
    reached = pdf.cumsum(-1) >= threshold
    steps = reached.float().argmax(-1)
    return torch.where(reached.any(-1), steps, torch.full_like(steps, pdf.shape[-1] - 1))


def official_exit_steps(gate_logits: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """The released Ouro code's default exit rule, op for op in the gates' own dtype: the exit
    distribution (as exit_distribution, without the float32 cast), its cumulative sum, and per
    token the first loop where it reaches `threshold` (the config's early_exit_threshold, 1.0),
    else the last loop. In bf16 sigmoid(g) rounds to exactly 1.0 for g above about 6, so such a
    token exits at that loop even at threshold 1.0; in float32 that needs g above about 17."""
    remaining = torch.ones_like(gate_logits[0])
    pdf = []
    for t, logit in enumerate(gate_logits):
        lam = torch.sigmoid(logit)
        if t < len(gate_logits) - 1:
            pdf.append(lam * remaining)
            remaining = remaining * (1.0 - lam)
        else:
            pdf.append(remaining)
    reached = torch.cumsum(torch.stack(pdf, dim=2), dim=2) >= threshold
    steps = torch.argmax(reached.float(), dim=2)
    steps[~reached.any(dim=2)] = len(gate_logits) - 1
    return steps


def fill_after_early_stop(policy, cache, last_loop: int, loops: int, start: int, end: int) -> None:
    """The loops after `last_loop` were not run for positions [start, end): their slots get what
    the policy keeps for a skipped loop (the last computed loop's rows), and so does MELT's
    open-chunk buffer (decode_reads="chunk"), which later tokens of the chunk read per loop."""
    if cache is None:
        return
    policy.fill_skipped_loops(cache, last_loop, loops, start, end)
    if open_chunk_grid(cache):
        for later in range(last_loop + 1, loops):
            for layer in range(policy.num_layers):
                cache.save_open_chunk(later, policy.slot(later, layer), start, end)
