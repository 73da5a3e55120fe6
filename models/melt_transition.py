"""MELT's two-phase post-training from an Ouro model, the pieces that touch the model:

Phase 1, interpolated transition (as the shared notes report the paper): attention reads
    KV = alpha * KV_MELT + (1 - alpha) * KV_Ouro,   alpha rising from 0 to 1 over the phase
(the rise's shape is not reported: linear here). `TransitionKVCache` keeps both sets of rows:
Ouro's per-loop rows (from x_t) and MELT's shared rows (from the gated state h_t).

Phase 2, attention-aligned distillation from the frozen Ouro teacher:
    L = L_KD + 0.1 * mean_{l,t} || o_MELT(l, t) - stopgrad(o_Ouro(l, t)) ||^2
with o the attention output of layer l at loop t. Not reported, chosen here: L_KD is the
token-mean KL(teacher || student) of the next-token distributions at temperature 1, and the
squared norm is averaged over tokens and hidden units (an MSE) before the mean over (l, t).
With masks (bench/training/convert.py passes them): L_KD over the target tokens only (an answer, for
question/answer data, as in SFT) and the MSE over every real (non-padding) token.

Both phases run chunk-wise (the model's `chunk_size`): parallel inside a chunk, sequential across
chunks, with autograd through the rows each chunk attended to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import LoopedKVCache, TransitionKVCache
from .looped import LoopedForCausalLM

ATTENTION_WEIGHT = 0.1


def transition_alpha(step: int, total_steps: int) -> float:
    """Linear 0 -> 1 over `total_steps` steps: the first step is pure Ouro, the last pure MELT."""
    if total_steps <= 1:
        return 1.0
    return min(1.0, max(0.0, step / (total_steps - 1)))


def transition_logits(melt: LoopedForCausalLM, input_ids: torch.Tensor, alpha: float, loops: int | None = None,
                      **forward_kwargs):
    """MELT's forward with attention over the alpha-mix of Ouro's and MELT's KV rows;
    `forward_kwargs` (attention_mask, chunk_starts) go to the model's forward."""
    loops = loops or melt.config.total_ut_steps
    layers = melt.config.num_hidden_layers
    functional = torch.is_grad_enabled()
    cache = TransitionKVCache(
        LoopedKVCache(loops * layers, loops, functional=functional),
        LoopedKVCache(layers, loops, functional=functional), alpha,
    )
    out = melt.model(input_ids, past_key_values=cache, loops=loops, **forward_kwargs)
    return melt.lm_head(out.last_hidden_state)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean KL(teacher || student) of the next-token distributions, over the positions
    where `mask` (batch, seq) is true (all when None)."""
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    student = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def attention_alignment_loss(student: dict, teacher: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (layer, loop) of the MSE between MELT's and the (detached) teacher's attention
    outputs; both dicts map (loop, layer) -> (batch, seq, hidden); `mask` (batch, seq) picks the
    tokens (all when None)."""
    if set(student) != set(teacher):
        raise ValueError("student and teacher must record the same (loop, layer) pairs")
    pick = (lambda t: t[mask]) if mask is not None else (lambda t: t)
    terms = [F.mse_loss(pick(student[key]).float(), pick(teacher[key]).detach().float()) for key in sorted(student)]
    return torch.stack(terms).mean()


def distillation_loss(
    melt: LoopedForCausalLM, teacher: LoopedForCausalLM, input_ids: torch.Tensor, loops: int | None = None,
    attention_weight: float = ATTENTION_WEIGHT, kd_mask: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
    chunk_starts: list[int] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Phase-2 loss on one batch; returns (loss, its parts for the log). `kd_mask` marks the
    positions whose next-token distributions are distilled, `token_mask` the real tokens whose
    attention outputs are aligned (both (batch, seq); all positions when None); `attention_mask`
    (left padding) goes to both models, `chunk_starts` to MELT's forward."""
    loops = loops or melt.config.total_ut_steps
    with torch.no_grad():
        t_out = teacher.model(input_ids, attention_mask=attention_mask, loops=loops, record_attention=True)
        t_logits = teacher.lm_head(t_out.last_hidden_state)
    s_out = melt.model(input_ids, attention_mask=attention_mask, loops=loops, record_attention=True,
                       chunk_starts=chunk_starts)
    s_logits = melt.lm_head(s_out.last_hidden_state)
    kd = kd_loss(s_logits, t_logits, kd_mask)
    align = attention_alignment_loss(s_out.attention, t_out.attention, token_mask)
    loss = kd + attention_weight * align
    return loss, {"loss": float(loss.detach()), "kd": float(kd.detach()), "attention_mse": float(align.detach())}
