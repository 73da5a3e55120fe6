"""MELT's KV-update gate and the paper's ablation of it: what a MELT layer projects its shared
cache's keys and values from, at every loop (kv_policy.SharedGatedKVPolicy makes one per layer).

The notes give AMC23 after phase 1: element-wise 77.7, single scalar 66.9, mean of loops 68.8,
EMA 68.6, last loop only 69.7. Each gate maps the layer's normed input x_t at loop t and the
token's state h_{t-1} to h_t. The equations of the four variants are our reading of those names
(the paper's method text is not available). `loop` is t, 0-based; h_prev is None at the first
loop."""

from __future__ import annotations

import torch
from torch import nn


class GateProjection(nn.Linear):
    """A gate weight (W_z or U_z); its own type so weight init can tell it from other Linears."""


class GatedUpdate(nn.Module):
    """h_t = z_t * h_{t-1} + (1 - z_t) * x_t, with the keep fraction z_t from `keep()`. First
    loop: `first_loop_state="input"` takes h_1 = x_1 (z unused), "zeros" takes h_0 = 0, i.e.
    h_1 = (1 - z_1) * x_1."""

    def __init__(self, first_loop_state: str = "input") -> None:
        super().__init__()
        self.first_loop_state = first_loop_state

    def keep(self, x: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor | None, loop: int = 0) -> torch.Tensor:
        if h_prev is None:
            if self.first_loop_state == "input":
                return x
            h_prev = torch.zeros_like(x)
        z = self.keep(x, h_prev)
        return z * h_prev + (1 - z) * x


class KVUpdateGate(GatedUpdate):
    """`elementwise` (MELT): a GRU-style update gate (no reset gate, no tanh), one per layer:

        z_t = sigmoid(x_t W_z + b_z + h_{t-1} U_z)          W_z, U_z: hidden x hidden
        h_t = z_t * h_{t-1} + (1 - z_t) * x_t

    Parameters per layer: 2 hidden^2 + hidden.
    """

    def __init__(self, hidden_size: int, first_loop_state: str = "input", width: int | None = None) -> None:
        super().__init__(first_loop_state)
        width = width or hidden_size
        self.w_z = GateProjection(hidden_size, width, bias=True)
        self.u_z = GateProjection(hidden_size, width, bias=False)

    def keep(self, x: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.w_z(x) + self.u_z(h_prev))


class ScalarGate(KVUpdateGate):
    """`scalar`: the same update with ONE gate value per token and layer, shared by all hidden
    dimensions:

        z_t = sigmoid(x_t w_z + b_z + h_{t-1} u_z)          w_z, u_z: hidden x 1
        h_t = z_t * h_{t-1} + (1 - z_t) * x_t

    Parameters per layer: 2 hidden + 1."""

    def __init__(self, hidden_size: int, first_loop_state: str = "input") -> None:
        super().__init__(hidden_size, first_loop_state, width=1)


class MeanGate(nn.Module):
    """`mean`: the token's state is the mean of its loops' inputs so far, no parameters:

        h_t = h_{t-1} + (x_t - h_{t-1}) / t                 (h_1 = x_1)

    Keys and values are linear in h, so a finished token keeps the mean of its loops' rows."""

    def __init__(self, hidden_size: int, first_loop_state: str = "input") -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor | None, loop: int = 0) -> torch.Tensor:
        return x if h_prev is None else h_prev + (x - h_prev) / (loop + 1)


class EmaGate(GatedUpdate):
    """`ema`: an exponential moving average over loops with one learned decay per layer:

        beta = sigmoid(b),   h_t = beta * h_{t-1} + (1 - beta) * x_t

    First loop as `elementwise`. Parameters per layer: 1."""

    def __init__(self, hidden_size: int, first_loop_state: str = "input") -> None:
        super().__init__(first_loop_state)
        self.logit = nn.Parameter(torch.zeros(1))  # b; init: the config's gate_bias_init

    def keep(self, x: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit).to(x.dtype)


class LastGate(nn.Module):
    """`last`: no gate, h_t = x_t: every loop rewrites the row with its own keys/values, so a
    finished token keeps its last loop's (the `last-loop` policy's sharing, in MELT's chunks).
    No parameters."""

    def __init__(self, hidden_size: int, first_loop_state: str = "input") -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor | None, loop: int = 0) -> torch.Tensor:
        return x


GATE_CLASSES = {"elementwise": KVUpdateGate, "scalar": ScalarGate, "mean": MeanGate, "ema": EmaGate,
                "last": LastGate}
