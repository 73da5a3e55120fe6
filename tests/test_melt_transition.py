"""MELT's two-phase post-training pieces: schedule, interpolated KV, losses, a real step."""

import pytest
import torch
from conftest import make_ouro

from melt_bench.models import MeltForCausalLM
from melt_bench.models.melt_transition import (
    attention_alignment_loss,
    distillation_loss,
    kd_loss,
    transition_alpha,
    transition_logits,
)


def test_alpha_rises_linearly_from_0_to_1():
    alphas = [transition_alpha(s, 5) for s in range(5)]
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert transition_alpha(99, 5) == 1.0 and transition_alpha(0, 1) == 1.0


@pytest.fixture
def pair(ids):
    ouro = make_ouro()
    melt = MeltForCausalLM.from_ouro(ouro, chunk_size=4).eval()
    with torch.no_grad():  # a gate that matters
        for layer in melt.model.layers:
            layer.self_attn.kv_gate.w_z.weight.normal_(std=0.3)
            layer.self_attn.kv_gate.u_z.weight.normal_(std=0.3)
            layer.self_attn.kv_gate.w_z.bias.zero_()
    return ouro, melt


def test_alpha_0_is_ouro_and_alpha_1_is_melt(pair, ids):
    ouro, melt = pair
    with torch.no_grad():
        torch.testing.assert_close(transition_logits(melt, ids, 0.0), ouro(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(transition_logits(melt, ids, 1.0), melt(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)
        middle = transition_logits(melt, ids, 0.5)
    assert not torch.allclose(middle, melt(ids, use_cache=False).logits, atol=1e-4)


def test_kd_and_attention_losses_on_hand_made_tensors():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    assert kd_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    teacher = torch.tensor([[[0.0, 0.0]]])
    student = torch.tensor([[[0.0, torch.log(torch.tensor(3.0))]]])  # p_s = (1/4, 3/4), p_t = (1/2, 1/2)
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert kd_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    s = {(0, 0): torch.ones(1, 2, 4), (1, 0): torch.zeros(1, 2, 4)}
    t = {(0, 0): torch.zeros(1, 2, 4), (1, 0): torch.zeros(1, 2, 4)}
    assert attention_alignment_loss(s, t).item() == pytest.approx(0.5)  # (1 + 0) / 2
    with pytest.raises(ValueError):
        attention_alignment_loss(s, {(0, 0): t[(0, 0)]})


def test_masks_pick_the_positions_the_losses_average_over():
    teacher = torch.zeros(1, 3, 2)
    student = torch.tensor([[[0.0, 5.0], [0.0, torch.log(torch.tensor(3.0))], [0.0, -7.0]]])
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    only_middle = torch.tensor([[False, True, False]])
    assert kd_loss(student, teacher, only_middle).item() == pytest.approx(expected.item(), rel=1e-5)
    s = {(0, 0): torch.tensor([[[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]]])}
    t = {(0, 0): torch.zeros(1, 3, 2)}
    assert attention_alignment_loss(s, t, torch.tensor([[True, False, True]])).item() == pytest.approx(0.5)
    assert attention_alignment_loss(s, t).item() == pytest.approx(10 / 3)


def test_one_distillation_step_moves_the_gate_and_lowers_the_loss(pair, ids):
    teacher, melt = pair
    melt.train()
    gate = [p for n, p in melt.named_parameters() if "kv_gate" in n]
    base = [p for n, p in melt.named_parameters() if "kv_gate" not in n]
    optimizer = torch.optim.Adam([{"params": base, "lr": 1e-4}, {"params": gate, "lr": 5e-3}])
    before = [p.detach().clone() for p in gate]
    loss, parts = distillation_loss(melt, teacher, ids)
    assert parts["kd"] >= 0 and parts["attention_mse"] > 0
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate)  # through the chunked cache
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, gate))
    with torch.no_grad():
        after, _ = distillation_loss(melt, teacher, ids)
    assert after.item() < loss.item()


def test_transition_phase_trains_through_both_caches(pair, ids):
    _, melt = pair
    melt.train()
    logits = transition_logits(melt, ids, 0.3)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = [p.grad for n, p in melt.named_parameters() if "kv_gate" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients(pair, ids):
    teacher, melt = pair
    grads = []
    for checkpointing in (False, True):
        melt.checkpoint_mlp_blocks(checkpointing)
        melt.train().zero_grad()
        distillation_loss(melt, teacher, ids)[0].backward()
        grads.append({n: p.grad.clone() for n, p in melt.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
