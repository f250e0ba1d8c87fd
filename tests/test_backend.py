"""The "smoothce" and "smoothce_aot_eager" torch.compile backends.

Numerics are checked against eager PyTorch in float64. Most cases run through smoothce_aot_eager
(same rewritten graph, same op and autograd, no code generation); the `inductor`-marked ones run
Inductor's full CPU code generation.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch._dynamo.testing import normalize_gm
from torch._inductor import config as inductor_config

from smoothce import compat
from smoothce.compiler.backend import rewrite_pass, smoothce_aot_eager, smoothce_backend

# float64 eager reference vs float32 compiled: the loss is a mean over a few rows of terms of
# size ~log(C); 1e-5 relative covers fp32 rounding of logsumexp and the matmul.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _fresh_pass():
    rewrite_pass.clear()
    yield
    rewrite_pass.clear()


class TinyClassifier(torch.nn.Module):
    def __init__(self, eps=0.1, reduction="mean"):
        super().__init__()
        self.proj = torch.nn.Linear(16, 10)
        self.eps = eps
        self.reduction = reduction

    def forward(self, x, y):
        return F.cross_entropy(self.proj(x), y, label_smoothing=self.eps, reduction=self.reduction)


def make_inputs(rows=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 16, generator=g)
    y = torch.randint(0, 10, (rows,), generator=g)
    y[3] = -100  # an ignored row: it must count neither in the sum nor in the mean's divisor
    return x, y


def eager_reference(model, x, y):
    """Loss and parameter gradients of a float64 copy of ``model`` in eager mode."""
    ref = type(model)(model.eps, model.reduction).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    loss = ref(x.double(), y)
    loss.sum().backward()
    return loss.detach(), {k: p.grad for k, p in ref.named_parameters()}


def capturing(backend):
    """``backend`` plus a list of the graphs it received (rewritten in place by the time it returns)."""
    graphs = []

    def capture(gm, example_inputs, **kwargs):
        compiled = backend(gm, example_inputs, **kwargs)
        graphs.append(gm)
        return compiled

    return capture, graphs


def smoothce_calls(gm):
    """Calls into smoothce: the functional the rewrite inserts or the op itself."""

    def is_smoothce(target):
        return "smoothce" in (getattr(target, "__module__", None) or "") or "smoothce" in str(target)

    return [n for n in gm.graph.nodes if n.op == "call_function" and is_smoothce(n.target)]


def cross_entropy_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.cross_entropy]


# --- fast: rewrite + AOTAutograd, no code generation -------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["plain", "smoothed"])  # eps=0 traces differently
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_training_matches_eager(eps, reduction):
    torch.manual_seed(0)
    model = TinyClassifier(eps, reduction)
    x, y = make_inputs()
    backend, graphs = capturing(smoothce_aot_eager)
    loss = torch.compile(model, backend=backend, fullgraph=True)(x, y)
    loss.sum().backward()

    expected, expected_grads = eager_reference(model, x, y)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=RTOL, atol=ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected_grads[name], rtol=RTOL, atol=ATOL)
    assert rewrite_pass.match_count == 1
    [gm] = graphs
    assert len(smoothce_calls(gm)) == 1 and cross_entropy_calls(gm) == []


def test_inference_under_no_grad_matches_eager():
    torch.manual_seed(0)
    model = TinyClassifier(0.1)
    x, y = make_inputs()
    with torch.no_grad():
        loss = torch.compile(model, backend="smoothce_aot_eager", fullgraph=True)(x, y)
    expected, _ = eager_reference(model, x, y)
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)
    assert rewrite_pass.match_count == 1


def test_graph_without_cross_entropy_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU())
    x, _ = make_inputs()
    backend, graphs = capturing(smoothce_aot_eager)
    before = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(before, model(x), rtol=0, atol=0)
    assert rewrite_pass.match_count == 0
    assert len(rewrite_pass.results) == 1 and rewrite_pass.results[0].near_misses == []
    assert smoothce_calls(graphs[0]) == []


class CheckpointedLoss(TinyClassifier):
    # Chunked-loss code checkpoints the head + loss so the logits are recomputed, not stored.
    def forward(self, x, y):
        return torch.utils.checkpoint.checkpoint(
            lambda x: F.cross_entropy(self.proj(x), y, label_smoothing=self.eps), x, use_reentrant=False
        )


def test_loss_inside_a_checkpointed_region_is_rewritten():
    torch.manual_seed(0)
    model = CheckpointedLoss(0.1)
    x, y = make_inputs()
    backend, graphs = capturing(smoothce_aot_eager)
    loss = torch.compile(model, backend=backend, fullgraph=True)(x, y)
    loss.backward()
    expected, expected_grads = eager_reference(model, x, y)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=RTOL, atol=ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected_grads[name], rtol=RTOL, atol=ATOL)
    # One result for the checkpoint body (the match), one for the outer graph (nothing).
    assert [len(r.matches) for r in rewrite_pass.results] == [1, 0]
    [gm] = graphs
    [body] = [m for name, m in gm.named_children() if isinstance(m, torch.fx.GraphModule)]
    assert len(smoothce_calls(body)) == 1 and cross_entropy_calls(body) == []


def test_dynamic_batch_size():
    # After an automatic-dynamic recompile the row count is a SymInt among the graph's inputs.
    torch.manual_seed(0)
    model = TinyClassifier(0.1)
    compiled = torch.compile(model, backend="smoothce_aot_eager")
    for rows in (12, 7, 5):
        x, y = make_inputs(rows)
        loss = compiled(x, y)
        expected, _ = eager_reference(model, x, y)
        torch.testing.assert_close(loss.detach().double(), expected, rtol=RTOL, atol=ATOL)
    # A static graph for 12 rows, then one dynamic graph serving 7 and 5.
    assert len(rewrite_pass.results) == 2
    assert rewrite_pass.match_count == 2


class TestRewrittenGraph(TestCase):
    def test_golden(self):
        torch.manual_seed(0)
        model = TinyClassifier(0.1)
        x, y = make_inputs()
        backend, graphs = capturing(smoothce_aot_eager)
        torch.compile(model, backend=backend, fullgraph=True)(x, y)
        [gm] = graphs
        self.assertExpectedInline(
            normalize_gm(gm.print_readable(print_output=False)),
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_self_modules_proj_parameters_weight_: "f32[10, 16]", L_self_modules_proj_parameters_bias_: "f32[10]", L_x_: "f32[12, 16]", L_y_: "i64[12]"):
        l_self_modules_proj_parameters_weight_ = L_self_modules_proj_parameters_weight_
        l_self_modules_proj_parameters_bias_ = L_self_modules_proj_parameters_bias_
        l_x_ = L_x_
        l_y_ = L_y_

        fused_linear_cross_entropy: "f32[]" = smoothce_kernels_linear_cross_entropy_fused_linear_cross_entropy(l_x_, l_self_modules_proj_parameters_weight_, l_self_modules_proj_parameters_bias_, l_y_, None, ignore_index = -100, reduction = 'mean', label_smoothing = 0.1);  l_x_ = l_self_modules_proj_parameters_weight_ = l_self_modules_proj_parameters_bias_ = l_y_ = None
        return (fused_linear_cross_entropy,)
""",
        )
        # A rewritten graph is a fixed point: with register_patterns() active as well, Inductor's
        # pre-grad pass sees the backend's output and must find nothing more to do.
        again = rewrite_pass.rewrite(gm)
        self.assertEqual((again.matches, again.near_misses), ([], []))


# --- mode and options --------------------------------------------------------------------------


def test_mode_and_options_become_inductor_config_patches():
    assert compat.inductor_config_patches(None, None) == {}
    assert compat.inductor_config_patches("default", None) == {}
    patches = compat.inductor_config_patches("max-autotune-no-cudagraphs", {"max_autotune": False})
    assert patches == {"max_autotune": False, "coordinate_descent_tuning": True}  # options win
    assert compat.inductor_config_patches(None, {"triton.cudagraphs": True}) == {"triton.cudagraphs": True}


def test_fuse_linear_option_reaches_the_rewrite():
    torch.manual_seed(0)
    model = TinyClassifier(0.1)
    x, y = make_inputs()
    expected, expected_grads = eager_reference(model, x, y)
    for fuse, replaced in ((False, {"cross_entropy"}), (True, {"cross_entropy", "linear"})):
        torch._dynamo.reset()
        rewrite_pass.clear()
        model.zero_grad()
        options = {"smoothce.fuse_linear": fuse}
        loss = torch.compile(model, backend="smoothce_aot_eager", options=options)(x, y)
        loss.backward()
        torch.testing.assert_close(loss.detach().double(), expected, rtol=RTOL, atol=ATOL)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.double(), expected_grads[name], rtol=RTOL, atol=ATOL)
        [match] = rewrite_pass.matches
        assert set(match.replaced) == replaced


def test_bad_options_fail_before_any_work():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="unknown Inductor option 'max_autotuen'"):
        smoothce_backend(gm, [], options={"max_autotuen": True})
    with pytest.raises(RuntimeError, match="'max_autotune' takes bool, got 'yes'"):
        smoothce_backend(gm, [], options={"max_autotune": "yes"})
    with pytest.raises(RuntimeError, match="Unrecognized mode=fastest"):
        smoothce_backend(gm, [], mode="fastest")
    with pytest.raises(RuntimeError, match="unknown option 'smoothce.fuse_lin'; known: smoothce.fuse_linear"):
        smoothce_backend(gm, [], options={"smoothce.fuse_lin": True})
    with pytest.raises(RuntimeError, match="'smoothce.fuse_linear' takes bool, got 1"):
        smoothce_aot_eager(gm, [], options={"smoothce.fuse_linear": 1})
    with pytest.raises(RuntimeError, match="takes only smoothce.* options, got options={'max_autotune': True}"):
        smoothce_aot_eager(gm, [], options={"max_autotune": True})
    assert rewrite_pass.results == []


# --- entry points: no smoothce import in user code ---------------------------------------------

_ENTRY_POINT_SCRIPT = """
import sys
import torch
import torch.nn.functional as F

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 10)
    def forward(self, x, y):
        return F.cross_entropy(self.proj(x), y, label_smoothing=0.1)

torch.manual_seed(0)
m = M()
x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
assert "smoothce" not in sys.modules
with torch.set_grad_enabled(TRAIN):
    loss = torch.compile(m, backend=BACKEND)(x, y)
if TRAIN:
    loss.backward()
torch.testing.assert_close(loss, m(x, y), rtol=1e-5, atol=1e-6)
print(sys.modules["smoothce.compiler.backend"].rewrite_pass.match_count)
"""


def _run_user_script(backend, train):
    script = textwrap.dedent(_ENTRY_POINT_SCRIPT).replace("BACKEND", repr(backend))
    script = script.replace("TRAIN", repr(train))
    env = os.environ.copy()
    env.setdefault("TRITON_INTERPRET", "1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_entry_point_smoothce_aot_eager():
    assert _run_user_script("smoothce_aot_eager", train=True) == "1"


@pytest.mark.inductor
def test_entry_point_smoothce():
    # Inference only: the training graphs go through Inductor in test_inductor_training_... below.
    assert _run_user_script("smoothce", train=False) == "1"


# --- full Inductor -----------------------------------------------------------------------------


class PostGradSpy(compat.CustomGraphPass):
    """An Inductor option whose effect is visible: records the post-grad graphs Inductor built."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(str(graph))

    def uuid(self):
        return "post-grad-spy"


@pytest.mark.inductor
def test_inductor_training_and_inference_match_eager():
    torch.manual_seed(0)
    model = TinyClassifier(0.1)
    x, y = make_inputs()
    spy = PostGradSpy()
    compiled = torch.compile(model, backend="smoothce", options={"post_grad_custom_post_pass": spy})

    def train_step():
        loss = compiled(x, y)
        loss.backward()
        return loss

    with compat.fresh_inductor_cache():
        loss, codes = compat.run_and_get_code(train_step)
        with torch.no_grad():
            inference, inference_codes = compat.run_and_get_code(
                torch.compile(model, backend="smoothce"), x, y
            )

    expected, expected_grads = eager_reference(model, x, y)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(inference.double(), expected, rtol=RTOL, atol=ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected_grads[name], rtol=RTOL, atol=ATOL)
    # One training graph and one inference graph were rewritten, and the op is what runs: the
    # head's linear only feeds the loss, so it is fused into it by default.
    assert rewrite_pass.match_count == 2
    assert "torch.ops.smoothce.linear_cross_entropy" in "\n".join(codes)
    assert "torch.ops.smoothce.linear_cross_entropy" in "\n".join(inference_codes)
    # options= reached Inductor: the spy ran on the forward and backward graphs.
    assert len(spy.graphs) == 2 and "smoothce.linear_cross_entropy" in spy.graphs[0]


class ModeSpy(PostGradSpy):
    """Records, from inside Inductor's compilation, the options a mode sets."""

    def __call__(self, graph):
        self.graphs.append((inductor_config.max_autotune, inductor_config.coordinate_descent_tuning))


@pytest.mark.inductor
def test_mode_reaches_inductor():
    x, y = make_inputs()
    spy = ModeSpy()
    # a fresh cache: on a hit Inductor would load the code and run no pass
    with inductor_config.patch(post_grad_custom_post_pass=spy), compat.fresh_inductor_cache(), torch.no_grad():
        loss = torch.compile(lambda x, y: F.cross_entropy(x[:, :10], y, label_smoothing=0.1), backend="smoothce",
                             mode="max-autotune-no-cudagraphs")(x, y)
    expected = F.cross_entropy(x[:, :10].double(), y, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)
    assert rewrite_pass.match_count == 1
    assert spy.graphs == [(True, True)]  # the mode's options, set while Inductor compiled the graph


@pytest.mark.inductor
def test_graph_without_cross_entropy_compiles_to_the_same_code_as_inductor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    x, _ = make_inputs()
    codes = {}
    for backend in ("inductor", "smoothce"):
        torch._dynamo.reset()
        with compat.fresh_inductor_cache():
            out, codes[backend] = compat.run_and_get_code(torch.compile(model, backend=backend), x)
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    assert rewrite_pass.match_count == 0
    assert [_without_aot_id(c) for c in codes["smoothce"]] == [_without_aot_id(c) for c in codes["inductor"]]


def _without_aot_id(code):
    # "# AOT ID: ['3_forward']" numbers the graphs compiled in this process; nothing else may differ.
    return re.sub(r"^# AOT ID: .*$", "# AOT ID", code, flags=re.M)
