"""A real client: a tiny, randomly initialised Hugging Face causal LM trained a few SGD steps.

The model is built from its config (no download). Three ways to get its loss:
- ``labels=``: transformers computes it (ForCausalLMLoss: ``logits.float()``, shift, ``view(-1, V)``,
  ``F.cross_entropy(ignore_index=-100, reduction='mean')``, or ``reduction='sum'`` divided by
  ``num_items_in_batch`` as the Trainer passes it). It has no label-smoothing argument.
- the same spelling with ``label_smoothing=0.1`` written by the user on the model's logits.
- transformers' Trainer ``LabelSmoother`` (hand-written: ``-log_softmax``, gather, sum / count).
The loss curve under backend="smoothce_aot_eager" must equal eager's, and the loss must have been
found and rewritten. Under full Inductor the model trains through the Trainer itself (below).
"""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

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


def tiny_llama(layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
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


_PEAK_SCRIPT = """
import json, torch, transformers
from smoothce.compiler.measure.memory import peak_cpu

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
ids = torch.randint(0, 4096, (4, 64))

def peak(options):
    model = transformers.LlamaForCausalLM(config).float()
    step = torch.compile(lambda: model(input_ids=ids, labels=ids).loss.backward(),
                         backend="smoothce_aot_eager", options=options)
    step()  # compile outside the measured step
    return peak_cpu(step, lambda: model.zero_grad(set_to_none=True))

print(json.dumps({"unfused": peak({"smoothce.fuse_linear": False}), "fused": peak({})}))
"""


def test_fused_head_lowers_the_step_peak():
    # With a vocabulary large against the hidden size, the logits dominate a step's memory: the
    # fused head + loss must peak well below the same step with the head left alone. Measured
    # the way the demo and the benchmarks measure (resident memory in a fresh process), not timed.
    from smoothce.compiler.measure.memory import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    (unfused, how), (fused, _) = peaks["unfused"], peaks["fused"]
    logits_bytes = 4 * 64 * 4096 * 4
    assert fused < unfused - logits_bytes // 2, (peaks, how, logits_bytes)


# --- the Trainer ---------------------------------------------------------------------------------
#
# accelerate compiles the model's forward (TrainingArguments(torch_compile=True)); smoothce comes
# in through register_patterns(). Each case trains the same tiny model on the same batches for
# STEPS steps; the rewrite needs full Inductor, so these share one Inductor cache (the model's
# own kernels compile once) and are marked `inductor`.


@pytest.fixture(scope="module")
def inductor_cache():
    from smoothce import compat

    with compat.fresh_inductor_cache():
        yield


def train_with_trainer(tmp_path, *, label_smoothing, compile, smoothce_loss):
    """Per-step losses of a Trainer run and the smoothce:: ops that ran in its last step.

    ``compile``: None (eager), "inductor" or "smoothce" (Inductor after register_patterns());
    ``smoothce_loss``: whether ``smoothce.move_loss_into_model`` prepared the Trainer."""
    pytest.importorskip("accelerate")
    import smoothce
    from smoothce.compiler import registration
    from torch.profiler import profile

    class RecordingTrainer(transformers.Trainer):
        def training_step(self, *args, **kwargs):
            # The profiler watches the last step only: compiling under it would be slow.
            last = len(self.losses) == STEPS - 1
            with profile() if last else contextlib.nullcontext() as prof:
                loss = super().training_step(*args, **kwargs)
            if last:
                self.ops = {e.name for e in prof.events() if e.name.startswith("smoothce::")}
            self.losses.append(loss.item())
            return loss

    # Dynamo would otherwise reuse the previous run's compiled forward (same code, guards pass):
    # its cache does not key on Inductor's passes.
    torch._dynamo.reset()
    data = [{"input_ids": ids[i], "labels": labels[i]} for ids, labels in batches() for i in range(BATCH)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
        lr_scheduler_type="constant", optim="sgd", label_smoothing_factor=label_smoothing,
        torch_compile=compile is not None, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, logging_strategy="no", seed=0,
    )
    # One layer: every layer adds compile time on CPU and nothing to what is tested.
    trainer = RecordingTrainer(model=tiny_llama(layers=1), args=args, train_dataset=data)
    trainer.losses = []
    if smoothce_loss:
        smoothce.move_loss_into_model(trainer)
    if compile == "smoothce":
        registration.register_patterns()
    try:
        trainer.train()
    finally:
        registration.unregister_patterns()
    return torch.tensor(trainer.losses, dtype=torch.float64), trainer.ops


@pytest.mark.inductor
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["no-smoothing", "label_smoothing_factor-0.1"])
def test_trainer_loss_in_the_compiled_model(tmp_path, inductor_cache, label_smoothing):
    # What the user had: the stock Trainer in eager mode (its LabelSmoother when smoothing).
    stock, _ = train_with_trainer(tmp_path, label_smoothing=label_smoothing, compile=None, smoothce_loss=False)
    # The same loss moved into the model, compiled by Inductor with and without the rewrite.
    inductor, ops = train_with_trainer(tmp_path, label_smoothing=label_smoothing, compile="inductor",
                                       smoothce_loss=True)
    assert ops == set()
    fused, ops = train_with_trainer(tmp_path, label_smoothing=label_smoothing, compile="smoothce",
                                    smoothce_loss=True)
    torch.testing.assert_close(fused, inductor, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fused, stock, rtol=RTOL, atol=ATOL)
    # Head and loss ran as one op: the logits were never materialised.
    assert "smoothce::linear_cross_entropy" in ops and "smoothce::cross_entropy_stats" not in ops, ops


def test_accelerate_refuses_the_backend_name(tmp_path):
    # Why Trainer users reach smoothce through register_patterns() (README): accelerate checks
    # torch_compile_backend against the backends it knows.
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], torch_compile=True,
                                          torch_compile_backend="smoothce")
    with pytest.raises(ValueError, match="SMOOTHCE"):
        transformers.Trainer(model=tiny_llama(layers=1), args=args)


def test_move_loss_into_model_rejects_what_it_cannot_move(tmp_path):
    pytest.importorskip("accelerate")
    import smoothce

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          label_smoothing_factor=0.1)
    classifier = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    with pytest.raises(TypeError, match="got LlamaForSequenceClassification with loss_type"):
        smoothce.move_loss_into_model(transformers.Trainer(model=classifier, args=args))
    own_loss = transformers.Trainer(model=tiny_llama(), args=args, compute_loss_func=lambda *a, **k: 0.0)
    with pytest.raises(ValueError, match="compute_loss_func=<function"):
        smoothce.move_loss_into_model(own_loss)


def test_move_loss_into_model_leaves_evaluation_its_logits(tmp_path):
    # README: the model returns only the loss while training; evaluation still gets the logits
    # (and the smoothed loss).
    pytest.importorskip("accelerate")
    import smoothce

    model = tiny_llama(layers=1)
    ids, labels = next(batches())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          label_smoothing_factor=0.1, per_device_eval_batch_size=BATCH)
    trainer = transformers.Trainer(model=model, args=args)
    smoothce.move_loss_into_model(trainer)
    predicted = trainer.predict([{"input_ids": ids[i], "labels": labels[i]} for i in range(BATCH)])
    torch.testing.assert_close(torch.as_tensor(predicted.predictions), logits, rtol=1e-6, atol=1e-6)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), labels[:, 1:].reshape(-1),
                               label_smoothing=0.1)
    assert predicted.metrics["test_loss"] == pytest.approx(expected.item(), rel=RTOL)
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss.double(), expected, rtol=RTOL, atol=ATOL)
