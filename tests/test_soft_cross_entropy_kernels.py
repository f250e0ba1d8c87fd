"""Every variant of the soft-target Triton kernel (kernels/soft_cross_entropy_triton.py), forced
through the op, against the forms' loss written out in float64 (tests/reference.py).

On CUDA when the machine has one, else through Triton's interpreter: small shapes, block sizes
chosen so that every loop runs more than once and ends in a partial block (C = 37 over 16-wide
blocks), tiles of two rows the last of which is partial, class dim 1 with strided columns, and
the gradient deferred to backward (the kernel's FROM_STATS pass).
"""

import pytest
import torch
import triton_cpu
from reference import soft_reference
from test_soft_cross_entropy import FEATURES, _call, check, make, run_pair

from smoothce.kernels import soft_cross_entropy_tuning as tuning
from smoothce.kernels.cross_entropy_tuning import ONE_PASS, TWO_PASS, KernelConfig
from smoothce.kernels.soft_cross_entropy import fused_soft_cross_entropy

VARIANTS = {
    "one_pass": KernelConfig(ONE_PASS, 1, 64, num_warps=4),
    "one_pass_rows": KernelConfig(ONE_PASS, 2, 64, num_warps=4),  # 2-row tiles, the last one partial
    "two_pass": KernelConfig(TWO_PASS, 1, 16, num_warps=4),
    "two_pass_reverse_rows": KernelConfig(TWO_PASS, 2, 16, reverse=True, num_warps=4),
}


@pytest.fixture
def variant(monkeypatch, device):
    """Force a kernel config through the launcher's fixed choice, autotuning off."""

    def use(config):
        monkeypatch.setattr(tuning, "default_config", lambda C: config)
        monkeypatch.setattr(tuning, "AUTOTUNE_MIN_ELEMENTS", float("inf"))
        monkeypatch.setenv("SMOOTHCE_KERNEL", "triton")
        return device

    triton_cpu.require(device)  # the interpreter, where it runs loops (Triton 3.6 needs numpy < 2.4)
    return use


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("feature", list(FEATURES))
def test_variants(variant, name, feature):
    device = variant(VARIANTS[name])
    tensors, spec = make(feature, shape=(5, 37), seed=50)
    tensors["x"].requires_grad_()
    tensors["t"].requires_grad_(feature == "log_probs_kl_reverse_softcap")  # the gradient in backward
    out, ref, g, gr = run_pair(_call(fused_soft_cross_entropy, "none", spec), _call(soft_reference, "none", spec),
                               tensors, device)
    check(out, ref, g, gr)


@pytest.mark.parametrize("name", ["one_pass_rows", "two_pass"])
def test_class_dim_1(variant, name):
    # (N, C, S) with S = 3: rows are (n, s) pairs, columns strided by S.
    device = variant(VARIANTS[name])
    tensors, spec = make("logits_labels_z_two_scales", shape=(3, 37, 3), seed=51)
    tensors["x"].requires_grad_()
    out, ref, g, gr = run_pair(_call(fused_soft_cross_entropy, "mean", spec), _call(soft_reference, "mean", spec),
                               tensors, device)
    check(out, ref, g, gr)


def test_the_fixed_choice():
    # One pass while both tiles fit in registers, two passes over 4K blocks beyond.
    assert tuning.default_config(37) == KernelConfig(ONE_PASS, 32, 64, num_warps=8)
    assert tuning.default_config(8192).mode == ONE_PASS
    assert tuning.default_config(8193) == KernelConfig(TWO_PASS, 1, 4096, reverse=True, num_warps=8, num_stages=2)
    assert all(cfg.block_c == 64 and cfg.mode == ONE_PASS for cfg in tuning.pick(tuning.candidates(), 37))
    assert {cfg.mode for cfg in tuning.pick(tuning.candidates(), 50000)} == {TWO_PASS}
