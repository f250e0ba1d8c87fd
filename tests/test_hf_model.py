"""A real client: a tiny, randomly initialised Hugging Face causal LM trained a few SGD steps.

The model is built from its config (no download). Three ways to get its loss:
- ``labels=``: transformers computes it (ForCausalLMLoss: ``logits.float()``, shift, ``view(-1, V)``,
  ``F.cross_entropy(ignore_index=-100, reduction='mean')``, or ``reduction='sum'`` divided by
  ``num_items_in_batch`` as the Trainer passes it). It has no label-smoothing argument.
- the same spelling with ``label_smoothing=0.1`` written by the user on the model's logits.
- transformers' Trainer ``LabelSmoother`` (hand-written: ``-log_softmax``, gather, sum / count).
The loss curve under backend="smoothce_aot_eager" must equal eager's, and under backend="smoothce"
Inductor's, and the loss must have been found and rewritten.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

transformers = pytest.importorskip("transformers")

from smoothce.compiler.backend import rewrite_pass  # noqa: E402

VOCAB, SEQ, BATCH, STEPS, LR = 64, 12, 3, 3, 0.5

# fp32 throughout; compiled and eager differ by reassociation only (~1e-7 relative per op), and
# three SGD steps do not amplify that past 1e-5 on a loss of about log(64) = 4.2.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(autouse=True)
def _fresh_pass():
    rewrite_pass.clear()
    yield
    rewrite_pass.clear()


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).float()


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[0, :4] = -100  # a masked prompt, as instruction tuning does
        yield ids, labels


def hf_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def hf_loss_num_items(model, ids, labels):
    # The Trainer's path: sum over tokens divided by the token count of the whole batch.
    num_items = (labels[:, 1:] != -100).sum()
    return model(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss


def user_smoothed_loss(model, ids, labels):
    logits = model(input_ids=ids).logits.float()
    shift_logits = logits[:, :-1].reshape(-1, VOCAB)
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, label_smoothing=0.1)


def trainer_label_smoother(model, ids, labels):
    from transformers.trainer_pt_utils import LabelSmoother

    outputs = model(input_ids=ids)
    return LabelSmoother(epsilon=0.1)(outputs, labels, shift_labels=True)


def train(loss_fn, backend):
    """Loss of each of STEPS SGD steps; ``backend=None`` runs eagerly."""
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = loss_fn if backend is None else torch.compile(loss_fn, backend=backend)
    losses = []
    for ids, labels in batches():
        opt.zero_grad()
        loss = step(model, ids, labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


# (loss, eps, reduction and family the rewrite must recover). The LabelSmoother divides by the
# count of non-padding tokens, which is the op's mean. Where the step returns only the loss, the
# LM head has no other reader and is fused with it: the logits are never materialised.
LOSSES = [
    pytest.param(hf_loss, 0.0, "mean", "linear+cross_entropy", id="hf-labels-mean"),
    pytest.param(hf_loss_num_items, 0.0, "sum", "linear+cross_entropy", id="hf-labels-num-items"),
    pytest.param(user_smoothed_loss, 0.1, "mean", "linear+cross_entropy", id="user-label-smoothing"),
    pytest.param(trainer_label_smoother, 0.1, "mean", "linear+hand-written eps/V", id="trainer-label-smoother"),
]


@pytest.mark.parametrize("loss_fn, eps, reduction, family", LOSSES)
def test_loss_curve_equals_eager(loss_fn, eps, reduction, family):
    expected = train(loss_fn, None)
    got = train(loss_fn, "smoothce_aot_eager")
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    # The loss was found (one graph, one loss: Dynamo compiles the step once for fixed shapes).
    assert rewrite_pass.match_count == 1, rewrite_pass.near_misses
    [match] = rewrite_pass.matches
    assert match.family == family
    assert match.params["eps"] == pytest.approx(eps, abs=1e-12)
    assert (match.params["reduction"], match.params["ignore_index"], match.params["classes"]) == (
        reduction,
        -100,
        VOCAB,
    )


@pytest.mark.inductor
def test_loss_curve_equals_inductor():
    # One case only: each full-Inductor compile of this model costs about a minute on CPU.
    expected = train(hf_loss, "inductor")
    assert rewrite_pass.match_count == 0
    got = train(hf_loss, "smoothce")
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert rewrite_pass.match_count == 1, rewrite_pass.near_misses


def test_fused_head_lowers_the_step_peak():
    # With a vocabulary large against the hidden size, the logits dominate a step's memory: the
    # fused head + loss must peak well below the same step with the head left alone. Memory is
    # counted from the profiler's allocation events (deterministic), not timed.
    from smoothce.compiler.demo import _cpu_step_peak

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ids = torch.randint(0, 4096, (4, 64))

    def peak(options):
        model = transformers.LlamaForCausalLM(config).float()
        step = torch.compile(hf_loss, backend="smoothce_aot_eager", options=options)
        step(model, ids, ids).backward()  # compile outside the measured step
        return _cpu_step_peak(lambda: step(model, ids, ids).backward())

    logits_bytes = ids.numel() * 4096 * 4
    unfused, fused = peak({"smoothce.fuse_linear": False}), peak({})
    assert fused < unfused - logits_bytes // 2, (fused, unfused, logits_bytes)
