"""How `convert` spreads over data-parallel ranks: the process group, DDP's gradient all-reduce,
FSDP2 sharding, and checkpoints in one layout-free form, so a run resumes on any number of ranks
whether it was sharded or not.

Under FSDP (`fully_shard`, torch's FSDP2) each decoder layer is one unit, and the embeddings with
the final norm and exit gate (`model.model`) and the `lm_head` are units of their own: the losses
call `model.model` and `lm_head` separately, so each must gather its own weights. Looped models
call every layer loops x chunks times per forward; `reshard_after_forward=False` (our default)
keeps a layer gathered from its first call to its backward, one all-gather per layer per
micro-batch, while True frees it after every call (least memory, loops x chunks all-gathers).
The frozen teacher always frees after each call: it has no backward to free it later, and as
Ouro it runs the sequence in one chunk, so that is `loops` all-gathers per layer. Gradients are
reduce-scattered as sums (divide factor 1), the arithmetic of DDP's all-reduce."""

from __future__ import annotations

import torch
from torch import nn

from melt_bench.running.ranks import distributed_rank


def process_group(cpu: bool) -> tuple[int, int]:
    """(rank, ranks): under accelerate launch / torchrun, accelerate's PartialState joins the
    process group (NCCL on GPUs, gloo on CPUs); (0, 1) in a single process."""
    _, world = distributed_rank()
    if world == 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise ValueError(f"{world} processes were launched but accelerate joined {state.num_processes}")
    return state.process_index, state.num_processes


def sum_across_ranks(model: nn.Module, summed: dict, tokens: int, gradients: bool = True) -> None:
    """One all-reduce (sum) of every gradient, flattened into one buffer as DDP's buckets are
    (skipped with `gradients=False`: FSDP has reduce-scattered them), and one of the logged sums
    and token count (`summed` gets `tokens`); every rank calls it alike."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if gradients:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)
    keys = sorted(summed)
    device = next(model.parameters()).device  # NCCL reduces only GPU tensors
    totals = torch.tensor([float(summed[key]) for key in keys] + [float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    summed.update({key: float(value) for key, value in zip(keys, totals[:-1].tolist())}, tokens=int(totals[-1]))


def shard(model: nn.Module, reshard_after_forward: bool = False) -> None:
    """FSDP2 over a LoopedForCausalLM in place (see the module's text for the units)."""
    from torch.distributed.fsdp import fully_shard

    units = [*model.model.layers, model.model, model.lm_head]
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sums, like the DDP all-reduce
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def held_bytes(models: list[nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of the models' weights, their gradients and the optimiser state
    (under FSDP its shards: about 1 / ranks of what DDP holds)."""
    from torch.distributed.tensor import DTensor

    params = [p for model in models for p in model.parameters()]
    tensors = [*params, *(p.grad for p in params if p.grad is not None),
               *(value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value))]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def _whole_on_cpu():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model: nn.Module) -> dict:
    """The whole model's weights on CPU, keyed by name, whatever the layout (a collective under
    FSDP: every rank calls it; rank 0 gets the whole of it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_whole_on_cpu())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """full_weights and the optimiser's state, keyed by parameter name, alike."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return full_weights(model), get_optimizer_state_dict(model, optimizer, options=_whole_on_cpu())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load what full_state returned (every rank holds it) into any layout; an optimiser state
    keyed by index (checkpoints written before this layout-free form) is renamed first."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    # strict=False: a parameter no loss reaches (Ouro's exit gate, in MELT's losses) has no Adam state
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(optimizer_state, model, optimizer),
                             options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state_by_name(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()`'s index-keyed form renamed to parameter names (a name-keyed one
    is returned as it is): index i is the i-th parameter over the param groups in order."""
    if all(isinstance(p, str) for group in state["param_groups"] for p in group["params"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
