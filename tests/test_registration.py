"""register_patterns / unregister_patterns: the rewrite as Inductor's pre-grad custom pass.

Most checks here look at the hook value only (no compile). The few that compile go through full
Inductor (pre-grad passes only run inside it) and are marked `inductor`.
"""

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config

from smoothce import compat
from smoothce.compiler import passes, registration
from smoothce.compiler.passes import CrossEntropyPass


@pytest.fixture(autouse=True)
def _clean_hook():
    # Every test starts and ends with no pre-grad pass installed and smoothce unregistered.
    registration.unregister_patterns()
    saved = inductor_config.pre_grad_custom_pass
    inductor_config.pre_grad_custom_pass = None
    yield
    registration.unregister_patterns()
    inductor_config.pre_grad_custom_pass = saved


@pytest.fixture(params=[True, False], ids=["hook-takes-list", "hook-takes-one-callable"])
def accepts_list(request, monkeypatch):
    # torch 2.13 takes a list of passes, torch 2.11 exactly one callable. 2.13 also takes a single
    # callable, so both code paths can run here.
    if request.param and not compat.PRE_GRAD_PASS_ACCEPTS_LIST:
        pytest.skip(f"torch {torch.__version__} takes one pre-grad callable only")
    monkeypatch.setattr(compat, "PRE_GRAD_PASS_ACCEPTS_LIST", request.param)
    return request.param


class CountingPass(compat.CustomGraphPass):
    """A user's own pre-grad pass: counts calls and the cross_entropy calls it saw."""

    def __init__(self, name="user"):
        self.name = name
        self.calls = 0
        self.saw_cross_entropy = []

    def __call__(self, graph):
        self.calls += 1
        self.saw_cross_entropy.append(
            any(n.op == "call_function" and n.target is F.cross_entropy for n in graph.nodes)
        )

    def uuid(self):
        return f"counting-pass-{self.name}"

    def __repr__(self):
        return f"CountingPass({self.name!r})"


def user_function_pass(graph):
    pass


# --- the hook value ----------------------------------------------------------------------------


def test_register_installs_one_pass_and_is_idempotent():
    import smoothce

    assert smoothce.register_patterns is registration.register_patterns
    assert smoothce.unregister_patterns is registration.unregister_patterns
    p = smoothce.register_patterns()
    assert isinstance(p, CrossEntropyPass)
    assert inductor_config.pre_grad_custom_pass is p
    assert registration.register_patterns() is p
    assert inductor_config.pre_grad_custom_pass is p
    assert registration.registered_pass() is p

    assert registration.unregister_patterns() is True
    assert inductor_config.pre_grad_custom_pass is None
    assert registration.registered_pass() is None
    assert registration.unregister_patterns() is False


def test_register_with_other_settings_replaces_the_pass(accepts_list):
    inductor_config.pre_grad_custom_pass = user_function_pass
    plain = registration.register_patterns(fuse_linear=False)
    fused = registration.register_patterns()
    assert fused is not plain and fused.fuse_linear and not plain.fuse_linear
    assert compat.pre_grad_passes(inductor_config.pre_grad_custom_pass) == (user_function_pass, fused)
    assert registration.register_patterns(fuse_linear=True) is fused
    # The setting changes the rewritten graph, so it changes the cache key.
    assert fused.uuid() != plain.uuid()
    registration.unregister_patterns()
    assert inductor_config.pre_grad_custom_pass is user_function_pass


@pytest.mark.parametrize("user_pass", [user_function_pass, CountingPass()], ids=["function", "CustomGraphPass"])
def test_chains_after_a_user_pass_and_restores_it(accepts_list, user_pass):
    inductor_config.pre_grad_custom_pass = user_pass
    ours = registration.register_patterns()
    hook = inductor_config.pre_grad_custom_pass
    if accepts_list:
        assert hook == [user_pass, ours]
    else:
        assert isinstance(hook, compat.ChainedPass)
        assert hook.passes == (user_pass, ours)
    assert compat.pre_grad_passes(hook) == (user_pass, ours)

    assert registration.register_patterns() is ours  # still one copy
    assert compat.pre_grad_passes(inductor_config.pre_grad_custom_pass) == (user_pass, ours)

    registration.unregister_patterns()
    assert inductor_config.pre_grad_custom_pass is user_pass


def test_a_user_list_is_extended_not_mutated_and_restored():
    if not compat.PRE_GRAD_PASS_ACCEPTS_LIST:
        pytest.skip(f"torch {torch.__version__} takes one pre-grad callable only")
    first, second = CountingPass("first"), CountingPass("second")
    user_list = [first, second]
    inductor_config.pre_grad_custom_pass = user_list
    ours = registration.register_patterns()
    assert inductor_config.pre_grad_custom_pass == [first, second, ours]
    assert user_list == [first, second]
    registration.unregister_patterns()
    assert inductor_config.pre_grad_custom_pass is user_list


def test_a_list_on_a_torch_that_takes_one_callable_is_an_error():
    with pytest.raises(TypeError, match="takes one callable"):
        compat.chain_pre_grad_pass([user_function_pass], CrossEntropyPass(), accepts_list=False)


def test_hook_changed_after_register(accepts_list):
    ours = registration.register_patterns()
    # The user adds a pass after ours: unregister takes only ours out.
    late = CountingPass("late")
    inductor_config.pre_grad_custom_pass = compat.chain_pre_grad_pass(
        inductor_config.pre_grad_custom_pass, late
    )
    assert registration.registered_pass() is ours
    registration.unregister_patterns()
    assert inductor_config.pre_grad_custom_pass is late

    # The user overwrites the hook: smoothce is no longer registered and leaves theirs alone.
    ours = registration.register_patterns()
    inductor_config.pre_grad_custom_pass = user_function_pass
    assert registration.registered_pass() is None
    assert registration.unregister_patterns() is False
    assert inductor_config.pre_grad_custom_pass is user_function_pass
    # Registering again chains onto what is there now.
    again = registration.register_patterns()
    assert again is not ours
    assert compat.pre_grad_passes(inductor_config.pre_grad_custom_pass) == (user_function_pass, again)


def test_chained_pass_uuid():
    ours = CrossEntropyPass()
    chained = compat.ChainedPass((CountingPass("a"), ours))
    assert chained.uuid() == ("counting-pass-a", ours.uuid())
    # A part without a uuid cannot be keyed: the whole chain opts out of caching, as 2.13 does.
    assert compat.ChainedPass((user_function_pass, ours)).uuid() is None


# --- uuid --------------------------------------------------------------------------------------


def test_uuid_is_stable_and_hashes_the_rewrite_sources(tmp_path, monkeypatch):
    a, b = CrossEntropyPass(), CrossEntropyPass()
    assert isinstance(a.uuid(), str) and a.uuid() == b.uuid()
    covered = {p.relative_to(passes._PACKAGE_ROOT).as_posix() for p in passes._source_files()}
    root = passes._PACKAGE_ROOT
    every = {p.relative_to(root).as_posix() for folder in ("patterns", "kernels") for p in (root / folder).rglob("*.py")}
    assert {"compiler/passes.py", "compat.py"} | every <= covered
    assert "patterns/interpret/targets.py" in every  # subpackages count too

    # Any edit to a covered file gives a new uuid (and so a new cache key).
    (tmp_path / "patterns").mkdir()
    (tmp_path / "kernels").mkdir()
    detector = tmp_path / "patterns" / "cross_entropy.py"
    detector.write_text("EPS = 0.1\n")
    monkeypatch.setattr(passes, "_PACKAGE_ROOT", tmp_path)
    monkeypatch.setattr(passes, "_source_files", lambda: [detector])
    before = passes.source_hash()
    detector.write_text("EPS = 0.2\n")
    assert passes.source_hash() != before


def test_copies_and_pickles_are_what_the_pass_does_not_what_it_saw():
    # torch 2.11 keys its FX graph cache on a deep copy and pickle of the Inductor config, this
    # pass included: a graph rewritten or a uuid asked for must not change the key.
    ours = CrossEntropyPass(label="hook", fuse_linear=False)
    blank = pickle.dumps(copy.deepcopy(ours))

    def backend(gm, example_inputs):
        ours.rewrite(gm)
        return gm

    torch.compile(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1), backend=backend)(
        torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    ours.uuid()
    assert ours.match_count == 1
    assert pickle.dumps(copy.deepcopy(ours)) == blank
    again = pickle.loads(blank)
    assert (again.label, again.fuse_linear, again.results, again.uuid()) == ("hook", False, [], ours.uuid())


# --- import is inert ---------------------------------------------------------------------------


def test_importing_smoothce_changes_nothing():
    # A fresh interpreter: snapshot Inductor's config and Dynamo's backend registry, import every
    # smoothce module that does not compile anything, and compare.
    script = textwrap.dedent(
        """
        import torch
        from torch._inductor import config
        from torch._dynamo.backends import registry
        before = config.get_config_copy()
        backends = dict(registry._BACKENDS)
        import smoothce, smoothce.compiler.backend, smoothce.compiler.registration
        assert config.get_config_copy() == before, "Inductor config changed on import"
        assert config.pre_grad_custom_pass is None
        assert dict(registry._BACKENDS) == backends, "backend registry changed on import"
        print("inert")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy(), timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "inert"


# --- under Inductor ----------------------------------------------------------------------------


class TinyClassifier(torch.nn.Module):
    def __init__(self, eps=0.1):
        super().__init__()
        self.proj = torch.nn.Linear(16, 10)
        self.eps = eps

    def forward(self, x, y):
        return F.cross_entropy(self.proj(x), y, label_smoothing=self.eps)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    y[3] = -100  # one ignored row
    return x, y


def _inductor_inference() -> str:
    """A TinyClassifier's loss compiled by Inductor (fresh caches, no grad), checked against float64
    eager; returns the generated code."""
    torch.manual_seed(0)
    model = TinyClassifier()
    x, y = _inputs()
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double(), y)
        with compat.fresh_inductor_cache():
            loss, codes = compat.run_and_get_code(torch.compile(model, backend="inductor"), x, y)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    return "\n".join(codes)


@pytest.mark.inductor
def test_registered_pass_rewrites_under_inductor_and_unregister_restores(accepts_list):
    user = CountingPass()
    inductor_config.pre_grad_custom_pass = user
    ours = registration.register_patterns()
    code = _inductor_inference()
    assert ours.match_count == 1
    assert user.calls == 1 and user.saw_cross_entropy == [True]  # the user's pass ran first
    assert "smoothce.linear_cross_entropy" in code  # head fused into the loss

    registration.unregister_patterns()
    assert inductor_config.pre_grad_custom_pass is user
    torch._dynamo.reset()
    code = _inductor_inference()
    assert ours.match_count == 1
    assert "smoothce" not in code


@pytest.mark.inductor
def test_registered_without_fuse_linear_keeps_the_head():
    ours = registration.register_patterns(fuse_linear=False)
    code = _inductor_inference()
    assert ours.match_count == 1
    assert "smoothce.cross_entropy" in code and "smoothce.linear_cross_entropy" not in code  # the head apart


@pytest.mark.inductor
def test_fx_graph_cache_misses_then_hits_with_the_pass_registered():
    ours = registration.register_patterns()
    torch.manual_seed(0)
    model = TinyClassifier()
    x, y = _inputs()
    with compat.fresh_inductor_cache(), torch.no_grad():
        start = compat.cache_counters()
        first = torch.compile(model, backend="inductor")(x, y)
        after_first = compat.cache_counters()
        torch._dynamo.reset()  # forget Dynamo's compiled code; the on-disk cache stays
        second = torch.compile(model, backend="inductor")(x, y)
        after_second = compat.cache_counters()
        # An edit to the rewrite's sources gives a new uuid: on 2.13 a new key, so a miss.
        ours._source_hash = "edited"
        torch._dynamo.reset()
        torch.compile(model, backend="inductor")(x, y)
        after_edit = compat.cache_counters()

    assert after_first["fxgraph_cache_miss"] - start["fxgraph_cache_miss"] == 1
    assert after_first["fxgraph_cache_hit"] == start["fxgraph_cache_hit"]
    # The second compile is served from the cache (AOTAutograd's, which loads Inductor's entry).
    hits = (after_second["fxgraph_cache_hit"] - after_first["fxgraph_cache_hit"]) + (
        after_second["autograd_cache_hit"] - after_first["autograd_cache_hit"]
    )
    assert hits >= 1
    assert after_second["fxgraph_cache_miss"] == after_first["fxgraph_cache_miss"]
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    # 2.13 keys the cache on the pass's uuid and skips the pass on a hit; 2.11 runs the pass
    # before the lookup and keys on the rewritten graph, which the edit did not change.
    if compat.pre_grad_pass_runs_on_cache_hit():
        assert after_edit["fxgraph_cache_miss"] == after_second["fxgraph_cache_miss"]
        assert ours.match_count == len(ours.results) == 3
    else:
        assert after_edit["fxgraph_cache_miss"] == after_second["fxgraph_cache_miss"] + 1
        assert ours.match_count == len(ours.results) == 2


# --- a warm cache in a fresh process -----------------------------------------------------------

_WARM_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch.profiler import profile

    mode = sys.argv[1]
    if mode == "register_patterns":
        import smoothce
        smoothce.register_patterns()
        backend = "inductor"
    else:
        backend = "smoothce"  # through its entry point: no smoothce import here

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 32)
    x, y = torch.randn(8, 16), torch.randint(0, 32, (8,))
    logits = torch.randn(8, 32, requires_grad=True)

    def plain(logits, y):  # the loss alone: smoothce::cross_entropy_stats, and _grad in backward
        return F.cross_entropy(logits, y, label_smoothing=0.1)

    def fused(x, y):  # head + loss: torch.ops.smoothce.linear_cross_entropy
        return F.cross_entropy(head(x), y, label_smoothing=0.1)

    losses = []
    with profile() as prof:
        for fn, args in ((plain, (logits, y)), (fused, (x, y))):
            loss = torch.compile(fn, backend=backend)(*args)
            loss.backward()
            losses.append(loss.item())
    ops = sorted({e.name for e in prof.events() if e.name.startswith("smoothce::")})
    from torch._dynamo.utils import counters
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print(json.dumps({"losses": [l.hex() for l in losses], "ops": ops, "cache_hits": hits}))
    """
)


@pytest.fixture(scope="module")
def shared_cache_dir(tmp_path_factory):
    # One directory for both cases: they share the kernels that are not the loss.
    return str(tmp_path_factory.mktemp("inductor-cache"))


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["backend", "register_patterns"])
def test_a_second_process_runs_the_op_from_the_caches(mode, shared_cache_dir):
    # Two fresh processes run the same script on one Inductor cache directory: the second loads
    # the compiled code from the FX graph / AOTAutograd caches, where nothing is rewritten, and
    # must still find the smoothce:: ops it calls.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_TRACE")}
    env["TORCHINDUCTOR_CACHE_DIR"] = shared_cache_dir
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _WARM_CACHE_SCRIPT, mode], capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert second["cache_hits"] >= 2, runs  # the forward graphs of both steps came from the caches
    assert second["ops"] == first["ops"], runs
    assert {"smoothce::cross_entropy_stats", "smoothce::cross_entropy_grad",
            "smoothce::linear_cross_entropy"} <= set(second["ops"]), runs
    assert second["losses"] == first["losses"], runs
