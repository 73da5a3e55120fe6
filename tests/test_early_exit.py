"""Exit distribution and the four ways of choosing logits."""

import pytest
import torch

from conftest import make_ouro
from melt_bench.models import exit_distribution, threshold_exit_steps


def test_exit_distribution_formula():
    logits = [torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[-2.0]])]
    lam = [torch.sigmoid(x).item() for x in logits]
    pdf = exit_distribution(logits)[0, 0]
    expected = [lam[0], lam[1] * (1 - lam[0]), (1 - lam[0]) * (1 - lam[1])]
    torch.testing.assert_close(pdf, torch.tensor(expected))
    assert pdf.sum().item() == pytest.approx(1.0)


def test_threshold_steps_fall_back_to_last_loop():
    pdf = torch.tensor([[[0.2, 0.7, 0.1], [0.05, 0.05, 0.9]]])
    assert threshold_exit_steps(pdf, 0.8).tolist() == [[1, 2]]
    assert threshold_exit_steps(pdf, 0.15).tolist() == [[0, 2]]
    assert threshold_exit_steps(pdf, 2.0).tolist() == [[2, 2]]  # never reached: last loop


class SaturatesAtStep2(torch.nn.Module):
    """Exit gate that says 'stay' at loop 1 and 'exit' at loop 2 and after."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, hidden):
        self.calls += 1
        value = -30.0 if self.calls % 4 == 1 else 30.0
        return torch.full(hidden.shape[:-1] + (1,), value)


def test_saturated_gate_exits_at_step_2(ids):
    model = make_ouro()
    reference_2 = model(ids, loops=2, use_cache=False).logits
    reference_4 = model(ids, loops=4, use_cache=False).logits
    model.model.early_exit_gate = SaturatesAtStep2()

    out = model(ids, use_cache=False, exit_threshold=0.9)
    assert (out.exit_steps == 1).all()
    torch.testing.assert_close(out.logits, reference_2)
    torch.testing.assert_close(out.exit_pdf[..., 1], torch.ones_like(out.exit_pdf[..., 1]))

    torch.testing.assert_close(model(ids, use_cache=False, use_weighted_exit=True).logits, reference_2)
    torch.testing.assert_close(model(ids, use_cache=False, exit_at_step=1).logits, reference_2)
    torch.testing.assert_close(model(ids, use_cache=False).logits, reference_4)  # default: last loop


def test_exit_step_out_of_range_is_refused(ids):
    with pytest.raises(ValueError, match="exit_at_step"):
        make_ouro()(ids, exit_at_step=4)


def test_loop_count_range(ids):
    model = make_ouro()
    with pytest.raises(ValueError, match="1..64"):
        model(ids, loops=65)
    assert model(ids[:, :3], loops=64, use_cache=False).logits.isfinite().all()
