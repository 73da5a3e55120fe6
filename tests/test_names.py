"""models/names.py and models/preset_table.py (plain Python, read before torch loads) name what
the torch modules implement: the two must not drift apart."""

import pytest
import torch

from melt_bench.models import kv_policy, melt_gates, names
from melt_bench.models.preset_table import PRESETS
from melt_bench.units import parse_dtype


def test_every_kv_policy_name_has_its_class_and_no_class_lacks_a_name():
    assert set(kv_policy._PLAIN) == set(names.PLAIN_KV_POLICIES)
    assert set(kv_policy._WITH_SLOTS) == set(names.SLOTTED_KV_POLICIES)
    for spec in names.TRAINING_FREE_POLICIES:
        name = names.parse_kv_policy(spec.replace(":N", ":2").replace(":S", ":3"))
        assert kv_policy.is_training_free(name), name
    assert not kv_policy.is_training_free("shared-gated")
    from melt_bench.models.huginn_kv import parse_huginn_kv_policy

    for spec in names.HUGINN_KV_POLICIES:  # Huginn's, as its code names them
        spec = spec.replace("N", "3")
        assert names.parse_kv_policy(spec) == spec == parse_huginn_kv_policy(spec).name


@pytest.mark.parametrize("spec", ["first-then-shared:1", "modulo:0", "modulo:x", "nope"])
def test_bad_kv_policy_specs_are_refused_by_the_grammar(spec):
    with pytest.raises(names.UnknownKVPolicyError):
        names.parse_kv_policy(spec)


def test_gates_dtypes_and_presets_resolve_to_real_objects():
    assert set(melt_gates.GATE_CLASSES) == set(names.GATES)
    assert {parse_dtype(name) for name in names.DTYPES} == {torch.float32, torch.bfloat16, torch.float16}
    from melt_bench.models.presets import model_class

    for preset in PRESETS.values():
        assert preset.config().model_type == model_class(preset.family).config_class.model_type
        assert preset.family in preset.config().model_type  # ouro, melt, huginn(_raven)
