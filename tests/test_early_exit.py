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


class PerRowGate(torch.nn.Module):
    """Batch row 0 exits after loop 1, row 1 after loop 3 (of 4)."""

    def __init__(self, exit_after=(1, 3), loops=4):
        super().__init__()
        self.exit_after, self.loops, self.calls = exit_after, loops, 0

    def forward(self, hidden):
        loop = self.calls % self.loops + 1
        self.calls += 1
        values = [30.0 if loop >= after else -30.0 for after in self.exit_after]
        return torch.tensor(values)[:, None, None].expand(hidden.shape[0], hidden.shape[1], 1)


def test_early_stop_runs_only_until_the_last_row_exits(ids):
    model = make_ouro()
    one, three = (model(ids, loops=t, use_cache=False).logits for t in (1, 3))
    model.model.early_exit_gate = PerRowGate()
    out = model(ids, use_cache=False, early_stop_threshold=0.9)
    assert out.loops_run == 3
    assert out.exit_steps[0].eq(0).all() and out.exit_steps[1].eq(2).all()
    torch.testing.assert_close(out.logits[0], one[0])
    torch.testing.assert_close(out.logits[1], three[1])


@pytest.mark.parametrize("family", ["ouro", "melt"])
def test_early_stop_while_decoding_fills_ouro_slots_and_keeps_decoding(ids, family):
    from conftest import make_melt

    model = make_ouro() if family == "ouro" else make_melt(chunk_size=1)
    cache = model.new_cache(4)
    model(ids[:, :6], past_key_values=cache)
    model.model.early_exit_gate = SaturatesAtStep2()
    step = model(ids[:, 6:7], past_key_values=cache, early_stop_threshold=0.5)
    assert step.loops_run == 2 and (step.exit_steps == 1).all()
    layers = model.config.num_hidden_layers
    if family == "ouro":  # loops 3 and 4 got the token's loop-2 rows
        for loop in (2, 3):
            torch.testing.assert_close(cache.keys[loop * layers][:, :, 6], cache.keys[layers][:, :, 6])
    assert cache.seq_len == 7 and cache.nbytes() == model.kv_bytes_per_token(4) * 2 * 7
    assert model(ids[:, 7:8], past_key_values=cache).logits.isfinite().all()


def test_threshold_one_runs_every_loop(ids):
    model = make_ouro()
    out = model(ids, use_cache=False, early_stop_threshold=1.0)
    assert out.loops_run == 4
    torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits)


def test_early_stop_arguments_are_checked(ids):
    from conftest import make_melt

    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        make_ouro()(ids, early_stop_threshold=1.5)
    with pytest.raises(ValueError, match="one chunk"):
        make_melt(chunk_size=4)(ids, early_stop_threshold=0.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        make_ouro()(ids, early_stop_threshold=0.5, exit_at_step=1)
