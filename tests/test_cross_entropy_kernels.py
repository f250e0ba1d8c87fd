"""Every variant of the Triton kernels (kernels/cross_entropy_triton.py) against LossForm's loss in
float64 (tests/reference.py): the fused kernel (loss and gradient in one launch, the fused head's)
through its launcher, and the statistics and gradient kernels of smoothce::cross_entropy_stats /
cross_entropy_grad through fused_cross_entropy with their tiles forced.

On CUDA when the machine has one, else through Triton's interpreter (small shapes, block sizes
chosen so that every loop runs more than once and ends in a partial block). The ``gpu`` tests
cover the grid on real hardware: dtypes x features x variants x reductions, class dim 1, and
more than 2^31 elements.
"""

import pytest
import torch
import triton_cpu
from reference import reference

from smoothce.kernels import cross_entropy_triton, cross_entropy_tuning
from smoothce.kernels.cross_entropy import fused_cross_entropy
from smoothce.kernels.cross_entropy_triton import launch_cross_entropy
from smoothce.kernels.cross_entropy_tuning import ONE_PASS, TWO_PASS, KernelConfig, Tile
from smoothce.kernels.form import LossForm
from smoothce.kernels.inputs import Labels, acc_dtype

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}

# Variants for rows of C = 37 (three 16-wide blocks, the last one partial) and N = 5 rows.
ROW_VARIANTS = {
    "one_pass": KernelConfig(ONE_PASS, 1, 64, num_warps=4),
    "one_pass_rows": KernelConfig(ONE_PASS, 2, 64, num_warps=4),  # 2-row tiles, the last one partial
    "two_pass": KernelConfig(TWO_PASS, 1, 16, num_warps=4),
    "two_pass_reverse_rows": KernelConfig(TWO_PASS, 2, 16, reverse=True, num_warps=4),
    "persistent": KernelConfig(TWO_PASS, 1, 16, reverse=True, programs_per_sm=1, num_warps=4),
}
# Variants for class dim 1 inputs (2, 9, 10): tiles of 4 positions along S (the last one partial).
ALONG_S_VARIANTS = {
    "along_s_one_pass": KernelConfig(ONE_PASS, 4, 16, num_warps=4),
    "along_s_two_pass": KernelConfig(TWO_PASS, 4, 4, reverse=True, num_warps=4),
}

FEATURES = {
    "plain": dict(),
    "smoothing_weight": dict(label_smoothing=0.1, weighted=True),
    "z_softcap_temperature": dict(label_smoothing=0.2, smoothing="others", z_loss=1e-2, softcap=3.0, logit_scale=0.7),
    "kl_scaled": dict(label_smoothing=0.1, smoothing="others", kl=True, scale=0.5),
    "no_ignore_index": dict(label_smoothing=0.1, ignore_index=None),
    "uniform_rows": dict(label_smoothing=0.3, weighted=True, uniform=True),
}
# What each variant's own code touches (column loads and weights, the smoothing sums, the logit
# transform, per-row loads); the row arithmetic they share (kl, no ignore_index) runs through the
# default variant in tests/test_cross_entropy.py, and on CUDA through every variant.
VARIANT_FEATURES = ["plain", "smoothing_weight", "z_softcap_temperature", "uniform_rows"]


# Tiles of the statistics and gradient kernels: rows of C = 37 in 16-wide blocks (the last one
# partial) and 2-row tiles over N = 5 rows (the last one partial), or the whole row in one block.
TILES = {
    "stream_looped": Tile(2, 16, num_warps=4),
    "stream_one_block": Tile(1, 64, num_warps=4),
}
ALONG_S_TILES = {"stream_along_s": Tile(4, 4, num_warps=4)}  # (2, 9, 10): 4 positions, 4 classes


@pytest.fixture
def device(device):
    """conftest's device, where the kernel can run: on CPU tensors the interpreter must work here."""
    triton_cpu.require(device)
    return device


@pytest.fixture
def variant(monkeypatch):
    """Force a kernel config (KernelConfig: the fused kernel's, whose launcher's fixed choice returns
    it, autotuning off, a 'GPU' of 2 SMs so that a persistent grid walks several tiles everywhere)
    or a Tile of the statistics and gradient kernels. Returns the loss function that runs it."""

    def use(config):
        monkeypatch.setenv("SMOOTHCE_KERNEL", "triton")
        if isinstance(config, Tile):
            monkeypatch.setattr(cross_entropy_tuning, "stream_tile", lambda *args: config)
            return fused_cross_entropy
        monkeypatch.setattr(cross_entropy_tuning, "default_config", lambda *args: config)
        monkeypatch.setattr(cross_entropy_tuning, "AUTOTUNE_MIN_ELEMENTS", float("inf"))
        monkeypatch.setattr(cross_entropy_triton, "_sm_count", lambda device: 2)
        return fused_kernel_loss

    return use


class _FusedKernel(torch.autograd.Function):
    """The loss and gradient as the fused kernel computes them in one launch: per-row parts and the
    gradient for grad_output 1, which backward scales (by row for 'none')."""

    @staticmethod
    def forward(ctx, x, y, weight, uniform_rows, loss_dtype, form):
        N, C = x.shape[:2]
        x3, y2 = x.reshape(N, C, -1), y.reshape(N, -1)
        u2 = None if uniform_rows is None else uniform_rows.reshape(y2.shape)
        acc = acc_dtype(x.dtype)
        labels = Labels(y2, weight, form.ignore_index, C, acc, u2)
        a, b, c = form.coefficients(C)
        rows = [torch.zeros(y2.numel(), dtype=acc, device=x.device) for _ in range(3)]
        grad = torch.empty_like(x3)
        launch_cross_entropy(x3, y2, weight, labels.scales(form.reduction), rows[0], rows[1], grad,
                             ignore_index=form.ignore_index, a=a, b=b, c=c, z_loss=form.z_loss, softcap=form.softcap,
                             logit_scale=form.logit_scale, uniform_rows=u2, smooth_rows=None if u2 is None else rows[2])
        ce, z, smooth = (r.view(y2.shape) for r in rows)
        loss, _ = labels.reduce(ce, z, form.reduction, form.z_loss, None if u2 is None else smooth)
        ctx.save_for_backward(grad.view(x.shape))
        ctx.reduction = form.reduction
        return loss.view(y.shape if form.reduction == "none" else ()).to(loss_dtype or x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
        return (grad * scale).to(grad.dtype), None, None, None, None, None


def fused_kernel_loss(x, y, weight=None, *, uniform_rows=None, loss_dtype=None, **form):
    return _FusedKernel.apply(x, y, weight, uniform_rows, loss_dtype, LossForm(**form))


def make(shape, dtype, feature, device, seed=0):
    """Logits of ``shape`` (class dim 1), labels with ignored and (for no_ignore_index) only valid
    entries, and the op's keyword arguments for the feature set."""
    torch.manual_seed(seed)
    C = shape[1]
    rows = (shape[0],) + tuple(shape[2:])
    x = (torch.randn(shape) * 3).to(dtype)
    y = torch.randint(0, C, rows)
    kwargs = {k: v for k, v in FEATURES[feature].items() if k not in ("weighted", "uniform")}
    if kwargs.get("ignore_index", -100) is not None:
        y.view(-1)[::4] = -100
    if FEATURES[feature].get("weighted"):
        kwargs["weight"] = torch.rand(C) + 0.5
    if FEATURES[feature].get("uniform"):
        kwargs["uniform_rows"] = torch.rand(rows) > 0.3
    return x, y, kwargs


def check_against_reference(x, y, kwargs, reduction, device, no_grad=False, loss_fn=fused_cross_entropy):
    """Loss and gradient (for a random grad_output) of loss_fn against float64; with no_grad also
    the loss computed without a gradient."""
    dtype = x.dtype
    xd = x.to(device).requires_grad_(True)
    ours_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    weight = ours_kwargs.pop("weight", None)
    out = loss_fn(xd, y.to(device), weight, reduction=reduction, **ours_kwargs)
    ref_kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
    x64 = x.double().requires_grad_(True)
    ref = reference(x64, y, ref_kwargs.pop("weight", None), reduction=reduction, **ref_kwargs)
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(out, xd, go.to(device, out.dtype))
    (gr,) = torch.autograd.grad(ref, x64, go)
    tol = TOL[dtype]
    assert out.dtype == dtype and g.dtype == dtype
    torch.testing.assert_close(out.detach().double().cpu(), ref.detach(), **tol)
    torch.testing.assert_close(g.double().cpu(), gr, atol=tol["atol"] * max(1.0, gr.abs().max().item()), rtol=tol["rtol"])
    if no_grad:  # the forward-only specialisation (no gradient written)
        with torch.no_grad():
            again = loss_fn(xd, y.to(device), weight, reduction=reduction, **ours_kwargs)
        torch.testing.assert_close(again.double().cpu(), ref.detach(), **tol)


def _reductions(feature):
    # 'sum' runs the kernel exactly as 'none' does (gradient scale 1); 'mean' scales it, and with
    # uniform_rows gives the smoothing part a scale of its own.
    return ["none", "sum", "mean"] if FEATURES[feature].get("uniform") else ["none", "mean"]


# ----------------------------------------------------------------------------------------------
# Every variant, every feature (interpreter or CUDA)
# ----------------------------------------------------------------------------------------------


ALL_ROW_VARIANTS = ROW_VARIANTS | TILES


@pytest.mark.parametrize("feature", VARIANT_FEATURES)
@pytest.mark.parametrize("name", list(ALL_ROW_VARIANTS))
def test_row_variants(variant, device, name, feature):
    loss_fn = variant(ALL_ROW_VARIANTS[name])
    x, y, kwargs = make((5, 37), torch.float32, feature, device)
    for reduction in _reductions(feature):
        check_against_reference(x, y, kwargs, reduction, device, no_grad=feature in ("plain", "z_softcap_temperature"),
                                loss_fn=loss_fn)


@pytest.mark.parametrize("feature", ["smoothing_weight", "z_softcap_temperature"])
@pytest.mark.parametrize("name", ["one_pass", "two_pass", "two_pass_reverse_rows", "stream_looped"])
def test_row_variants_on_whole_blocks(variant, device, name, feature):
    # C = 64: the one-pass tile is the row exactly and the column blocks divide it, so every load
    # and store of the fused kernel runs without a column mask (the rows' own mask stays with
    # 2-row tiles), as do the statistics kernel's.
    loss_fn = variant(ALL_ROW_VARIANTS[name])
    x, y, kwargs = make((5, 64), torch.float32, feature, device)
    check_against_reference(x, y, kwargs, "mean", device, loss_fn=loss_fn)


@pytest.mark.parametrize("name", list(ALL_ROW_VARIANTS))
def test_row_variants_on_strided_columns(variant, device, name):
    # (9, 37) logits with column-major strides: the class stride is 9 (CONTIGUOUS off).
    loss_fn = variant(ALL_ROW_VARIANTS[name])
    torch.manual_seed(4)
    x = torch.randn(37, 5).t() * 3
    y = torch.randint(0, 37, (5,))
    y[2] = -100
    check_against_reference(x, y, dict(weight=torch.rand(37) + 0.5, label_smoothing=0.1), "mean", device,
                            loss_fn=loss_fn)


@pytest.mark.parametrize("feature", VARIANT_FEATURES)
@pytest.mark.parametrize("name", list(ALONG_S_VARIANTS | ALONG_S_TILES))
def test_class_dim_1_variants(variant, device, name, feature):
    loss_fn = variant((ALONG_S_VARIANTS | ALONG_S_TILES)[name])
    x, y, kwargs = make((2, 9, 10), torch.float32, feature, device)
    for reduction in _reductions(feature):
        check_against_reference(x, y, kwargs, reduction, device, loss_fn=loss_fn)


@pytest.mark.parametrize("name, dtype", [(n, torch.bfloat16) for n in ALL_ROW_VARIANTS] + [("two_pass", torch.float16)])
def test_16_bit_logits(variant, device, name, dtype):
    loss_fn = variant(ALL_ROW_VARIANTS[name])
    x, y, kwargs = make((5, 37), dtype, "smoothing_weight", device)
    check_against_reference(x, y, kwargs | dict(z_loss=1e-3), "mean", device, loss_fn=loss_fn)


def _launch(x3, y2, grad3, config, weight=None):
    ce_rows = torch.empty(x3.shape[0], device=x3.device)
    z_rows = torch.zeros(x3.shape[0], device=x3.device)
    weight = None if weight is None else weight.to(x3.device)
    launch_cross_entropy(x3, y2, weight, torch.ones(2, device=x3.device), ce_rows, z_rows, grad3, ignore_index=-100,
                         a=0.9, b=0.1 / x3.shape[1], c=0.0, z_loss=0.0, softcap=None, config=config)
    return ce_rows


@pytest.mark.parametrize("name", list(ROW_VARIANTS))
def test_out_of_range_labels_give_a_nan_row(device, name):
    # Where a check would need a device sync (CUDA), the kernel never reads out of bounds and
    # marks the row nan; the launcher is called directly, as on CUDA (no CPU label check).
    x = torch.randn(4, 37, 1, device=device)
    y = torch.tensor([[0], [37], [-100], [-5]], device=device)
    grad = torch.empty_like(x)
    ce_rows = _launch(x, y, grad, ROW_VARIANTS[name])
    assert ce_rows[0].isfinite() and ce_rows[1].isnan() and ce_rows[2] == 0 and ce_rows[3].isnan()
    assert grad[1].isnan().all() and (grad[2] == 0).all() and grad[0].isfinite().all() and grad[3].isnan().all()


@pytest.mark.parametrize("name", list(ROW_VARIANTS))
def test_gradient_written_over_the_logits(device, name):
    # The linear op's chunks: the gradient goes into the logits' own buffer.
    torch.manual_seed(3)
    x = torch.randn(5, 37, 1, device=device)
    y = torch.randint(0, 37, (5, 1), device=device)
    separate = torch.empty_like(x)
    expected = _launch(x, y, separate, ROW_VARIANTS[name])
    got = _launch(x, y, x, ROW_VARIANTS[name])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x, separate)


def test_a_one_pass_tile_narrower_than_the_row_is_refused(device):
    x = torch.randn(2, 37, 1, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        _launch(x, torch.zeros(2, 1, dtype=torch.long, device=device), x, KernelConfig(ONE_PASS, 1, 32))


# ----------------------------------------------------------------------------------------------
# The tuning table
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 2, 37, 1000, 4096, 32000, 32768, 50257, 65536, 131072, 262144])
@pytest.mark.parametrize("rows_along_s", [False, True])
@pytest.mark.parametrize("lean", [False, True])
def test_every_tuning_choice_fits(C, rows_along_s, lean):
    # Whether what pick() keeps computes the right result is run below; here, what it keeps at all.
    chosen = cross_entropy_tuning.pick(cross_entropy_tuning.candidates(), C, rows_along_s, lean)
    default = cross_entropy_tuning.default_config(C, rows_along_s)
    assert chosen and default.fits(C)
    assert len(chosen) <= 12  # tuning compiles every candidate once per key
    # a whole 32K row holds only the logits without spilling
    assert lean or all(cfg.block_c <= 16384 for cfg in chosen if cfg.mode == ONE_PASS)


@pytest.mark.parametrize("C", [
    37,  # one pass: single rows and tiles of up to 128 rows, all over 5 rows
    3000,  # one pass over a padded 4096-wide row, 1 or 2 rows a tile
    40000,  # two passes, 8192 and 16384 wide, every program resident or 1 or 2 per SM
])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_every_configuration_the_tuner_keeps_computes_the_loss(monkeypatch, device, C, in_place, weighted):
    # On CUDA the autotuner runs whichever of these it finds fastest: each must be right.
    kept = cross_entropy_tuning.pick(cross_entropy_tuning.candidates(), C, False, False)  # smoothed: not lean
    assert kept
    torch.manual_seed(6)
    x = torch.randn(5, C, 1) * 3
    y = torch.randint(0, C, (5, 1))
    y[3] = -100
    weight = torch.rand(C) + 0.5 if weighted else None
    x64 = x.double().squeeze(2).requires_grad_(True)
    ref = reference(x64, y.squeeze(1), None if weight is None else weight.double(), label_smoothing=0.1,
                    reduction="none")
    (gr,) = torch.autograd.grad(ref.sum(), x64)
    monkeypatch.setattr(cross_entropy_triton, "_sm_count", lambda device: 2)  # persistent grids walk tiles
    for cfg in kept:
        xd = x.to(device, copy=True)  # a gradient written over the logits overwrites them
        grad = xd if in_place else torch.empty_like(xd)
        ce_rows = _launch(xd, y.to(device), grad, cfg, weight)
        torch.testing.assert_close(ce_rows.double().cpu(), ref.detach(), **TOL[torch.float32], msg=str(cfg))
        torch.testing.assert_close(grad.squeeze(2).double().cpu(), gr, **TOL[torch.float32], msg=str(cfg))


# ----------------------------------------------------------------------------------------------
# GPU: the grid on real hardware
# ----------------------------------------------------------------------------------------------

GPU_VARIANTS = {
    "one_pass": KernelConfig(ONE_PASS, 1, 32768, num_warps=32),
    "two_pass": KernelConfig(TWO_PASS, 1, 8192, reverse=True, num_warps=16, num_stages=2),
    "persistent": KernelConfig(TWO_PASS, 1, 8192, reverse=True, programs_per_sm=1, num_warps=16, num_stages=2),
    "stream": cross_entropy_tuning.stream_tile(32000, False),  # the statistics and gradient kernels
}


@pytest.mark.gpu
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name", list(GPU_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_grid(variant, name, feature, dtype):
    loss_fn = variant(GPU_VARIANTS[name])
    x, y, kwargs = make((64, 32000), dtype, feature, "cuda")
    for reduction in _reductions(feature):
        check_against_reference(x, y, kwargs, reduction, "cuda", loss_fn=loss_fn)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(ALONG_S_VARIANTS) + ["fused_default", "default"])
def test_gpu_class_dim_1(variant, name):
    # Segmentation-shaped logits (N, C, H, W).
    loss_fn = variant(ALONG_S_VARIANTS[name]) if name in ALONG_S_VARIANTS else \
        fused_kernel_loss if name == "fused_default" else fused_cross_entropy
    x, y, kwargs = make((4, 21, 32, 32), torch.bfloat16, "smoothing_weight", "cuda")
    check_against_reference(x, y, kwargs, "mean", "cuda", loss_fn=loss_fn)


@pytest.mark.gpu
def test_gpu_autotuned():
    # Large enough for the fused kernel to autotune: the chosen config's result against float64
    # on a few rows.
    x, y, kwargs = make((512, 65536), torch.bfloat16, "smoothing_weight", "cuda")
    xd = x.cuda().requires_grad_(True)
    out = fused_kernel_loss(xd, y.cuda(), kwargs["weight"].cuda(), label_smoothing=0.1, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), xd)
    rows = torch.tensor([0, 1, 255, 511])
    x64 = x[rows].double().requires_grad_(True)
    ref = reference(x64, y[rows], kwargs["weight"].double(), label_smoothing=0.1, reduction="none")
    (gr,) = torch.autograd.grad(ref.sum(), x64)
    torch.testing.assert_close(out.detach()[rows.cuda()].double().cpu(), ref.detach(), **TOL[torch.bfloat16])
    torch.testing.assert_close(g[rows.cuda()].double().cpu(), gr, atol=1e-3, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["two_pass", "stream"])
def test_gpu_int64_offsets_past_2_pow_31_elements(variant, name):
    # 8193 x 262144 bf16 = 2^31 + 2^18 elements: int32 offsets would wrap for the last row.
    loss_fn = variant(GPU_VARIANTS[name] if name != "stream" else cross_entropy_tuning.stream_tile(262144, False))
    torch.manual_seed(11)
    N, C = 8193, 262144
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, C, (N,), device="cuda")
    out = loss_fn(x, y, label_smoothing=0.1, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), x)
    rows = torch.tensor([0, N - 1], device="cuda")
    x64 = x.detach()[rows].double().cpu().requires_grad_(True)
    ref = reference(x64, y[rows].cpu(), label_smoothing=0.1, reduction="none")
    (gr,) = torch.autograd.grad(ref.sum(), x64)
    torch.testing.assert_close(out.detach()[rows].double().cpu(), ref.detach(), **TOL[torch.bfloat16])
    torch.testing.assert_close(g[rows].double().cpu(), gr, atol=1e-3, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_backward_scaling(device, dtype, scale):
    # Backward's in-place grad *= grad_output, read on the device and skipped when it is 1; on a
    # permuted (dense) gradient, over several blocks per program.
    from smoothce.kernels.cross_entropy_triton import scale_in_place

    torch.manual_seed(5)
    g = torch.randn(70, 130, device=device).to(dtype).t()
    expected = (g.float() * scale).to(dtype)
    out = scale_in_place(g, torch.tensor(scale, device=device))
    assert out is g
    # the product in fp32, rounded once (the interpreter's bf16 rounding may differ by an ulp)
    torch.testing.assert_close(g, expected, rtol=2**-7 if dtype == torch.bfloat16 else 0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gpu_no_host_sync(monkeypatch, path, reduction):
    # Forward and backward never wait for the device (the first call may: compiling, tuning).
    monkeypatch.setenv("SMOOTHCE_KERNEL", path)
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (64,), device="cuda")
    y[::5] = -100

    def step():
        loss = fused_cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
        loss.backward(torch.ones_like(loss))

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------
# Without a GPU: the statistics and gradient kernels still compile for one, with 16-byte accesses
# ----------------------------------------------------------------------------------------------

# Compiled through the launchers (compile_for: specialised as a launch on that GPU would be, run
# nowhere) in a process of its own: Triton compiled, not interpreted.
_COMPILE_STREAM_FOR_SM90 = r"""
import json, sys
import torch
from smoothce.kernels.cross_entropy_triton import launch_row_grad, launch_row_stats
from smoothce.kernels.triton_target import GPUTarget

N = 64
out = {}
for C in json.loads(sys.argv[1]):
    x = torch.empty(N, C, 1, dtype=torch.bfloat16)  # address space only: nothing runs
    y = torch.zeros(N, 1, dtype=torch.long)
    rows = torch.empty(3, N)
    # every feature but class weights, whose fp32 loads would be 16 bytes wide as well
    kw = dict(logit_scale=1.0, softcap=30.0, weighted_sum=True, compile_for=GPUTarget("cuda", 90, 32))
    for name, kernels in (("stats", launch_row_stats(x, y, None, rows, **kw)),
                          ("grad", launch_row_grad(rows, x, y, None, rows[0], torch.empty_like(x), **kw))):
        (kernel,) = kernels
        ptx = kernel.asm["ptx"].splitlines()
        out[f"{name}-{C}"] = [sum(".v4." in line for line in ptx if op in line) for op in ("ld.global", "st.global")]
print(json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine compiles and runs the kernels for real")
def test_statistics_and_gradient_kernels_compile_for_sm90_with_16_byte_accesses():
    # Compiled here for sm_90 (Triton's own ptxas, no GPU) with bf16 logits, as the launchers
    # specialise them: the logits are read 16 bytes at a time, and the gradient written so. Without
    # class weights, the only vector loads and stores are the logits' and the gradient's.
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    Cs = [4096, 131072]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_STREAM_FOR_SM90, json.dumps(Cs)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for C in Cs:  # one row per tile: the per-row values load one at a time
        assert counts[f"stats-{C}"][0] > 0, counts
        assert all(n > 0 for n in counts[f"grad-{C}"]), counts
