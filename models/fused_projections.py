"""Projections of one input as one matmul, for the eager decode step: q, k and v (k and v for
MELT, whose keys and values come from its gated state), and the MLP's gate and up.

At batch 1 each projection is a GEMV whose speed on a CPU grows with the matrix: one thread,
fp32, MKL, 512 x 512 at 12 GB/s, 1,536 x 512 at 19 (docs/cpu-decode-profile.md). Fusing keeps
every parameter as it is to its users (same shape, values, state-dict key, requires_grad): the
weights become row blocks (views) of one fused tensor, so no byte is added. Loading a state dict
copies into the views, so the fusion stays current. Anything that gives a weight new storage
(`.to()`, a deepcopy, `load_state_dict(assign=True)`) leaves it stale, and `FusedLinear.current()`
says so: the module then drops it and runs its projections one by one. (A Linear replaced by
another module, e.g. an adapter, is not noticed: fuse after such surgery.) Any no-grad forward
uses it, not only the decode step's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FusedLinear:
    weight: torch.Tensor  # (sum of the outputs, in); the modules' weights are its row blocks
    linears: list[nn.Linear]
    pointers: list[int]  # each weight's data_ptr when fused
    in_out_contiguous: bool

    def current(self) -> bool:
        """Whether every weight is still its view of `weight`."""
        return all(linear.weight.data_ptr() == at for linear, at in zip(self.linears, self.pointers))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight).split([linear.out_features for linear in self.linears], -1)


def fuse_linears(linears: list[nn.Linear], in_out_contiguous: bool) -> FusedLinear:
    """Bias-free Linears of one input as one (sum of outputs, in) weight; `in_out_contiguous`
    stores it as the transpose of a contiguous (in, sum of outputs) tensor (MKL's fast fp32
    GEMV), each weight then a column block of that with strides (1, sum of outputs)."""
    if any(linear.bias is not None for linear in linears):
        raise ValueError("fuse_linears fuses bias-free projections only")
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode the caller is in
        weights = [linear.weight.data for linear in linears]
        fused = torch.cat([w.t() for w in weights], 1).contiguous().t() if in_out_contiguous else torch.cat(weights)
        start = 0
        for linear in linears:
            rows = linear.out_features
            linear.weight.data = fused[start:start + rows]
            start += rows
    return FusedLinear(fused, list(linears), [linear.weight.data_ptr() for linear in linears], in_out_contiguous)


def unfuse(fused: FusedLinear | None) -> list[nn.Linear]:
    """Give each weight of a current fusion storage of its own (contiguous); returns those changed."""
    if fused is None or not fused.current():
        return []
    with torch.inference_mode(False), torch.no_grad():
        for linear in fused.linears:
            linear.weight.data = linear.weight.data.clone(memory_format=torch.contiguous_format)
    return fused.linears
