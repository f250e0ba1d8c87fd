"""The ``llama`` benchmark case measures what its rows say: a Hugging Face LlamaForCausalLM training
step with transformers' own loss or the Trainer's LabelSmoother, each row naming its loss.

Only eager PyTorch runs here (compiling the model takes minutes on CPU); nothing is timed.
"""

import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(REPO_ROOT)  # benchmarks/ lives at the repository root, not installed


def problem(smoothing, n=32, v=64, d=128):
    from benchmarks.harness import Problem

    return Problem("llama", n, v, d, "float32", smoothing, "cpu")


def test_inputs_are_the_model_and_a_batch():
    from benchmarks.llama import CASES

    inputs = CASES["llama"].make_inputs(problem(0.0))
    model, ids, labels = inputs.args
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 128, 64)
    assert ids.shape == (2, 16) and (labels[0, :2] == -100).all()
    assert torch.equal(labels[0, 2:], ids[0, 2:]) and torch.equal(labels[1], ids[1])
    assert inputs.leaves == list(model.parameters())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_is_the_shifted_cross_entropy(smoothing):
    # Both losses are PyTorch's cross-entropy of the next token with the label smoothing of the row
    # (LabelSmoother's (1 - eps) nll + eps / V * sum_j -log p_j is exactly F.cross_entropy's).
    from benchmarks.llama import CASES

    case = CASES["llama"]
    model, ids, labels = case.make_inputs(problem(smoothing)).args
    loss = case.methods["eager"].build(problem(smoothing))(model, ids, labels)
    logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
    expected = F.cross_entropy(logits, labels[:, 1:].flatten(), label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_every_method_names_the_loss():
    # The runner puts what diagnose returns into the row's note.
    from benchmarks.llama import CASES

    methods = CASES["llama"].methods
    assert list(methods) == ["eager", "inductor", "smoothce-backend"]
    for method in methods.values():
        assert method.diagnose(problem(0.0), []) == "loss: HF labels= (ForCausalLMLoss)"
        assert method.diagnose(problem(0.1), []) == "loss: LabelSmoother(epsilon=0.1) on the logits"
