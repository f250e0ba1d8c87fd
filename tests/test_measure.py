"""compiler/measure/: the tiny LM, step-time statistics and the progress bar shared by the demo and the
benchmarks (peak memory is exercised by the HF test and the benchmark smoke test, in fresh
processes)."""

import io
import re

import pytest
import torch

from smoothce.compiler.measure import timing
from smoothce.compiler.measure.progress import Progress
from smoothce.compiler.measure.tiny_lm import PAD, TinyLM, smoothed_cross_entropy


def test_tiny_lm_is_the_same_in_every_process_and_pads_its_targets():
    (m1, idx1, t1), (m2, idx2, t2) = (TinyLM.build("cpu", vocab=64, dim=8, batch=3, seq=10) for _ in range(2))
    assert torch.equal(idx1, idx2) and torch.equal(t1, t2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert idx1.shape == t1.shape == (3, 10)
    assert torch.equal(idx1[:, 1:], t1[:, :-1])  # targets are the next tokens
    assert (t1 == PAD).any() and (t1 != PAD).any()


def test_model_loss_and_hand_written_loss_are_one_loss():
    # F.cross_entropy(label_smoothing, ignore_index=PAD) in the model, the demo's spelling by hand.
    model, idx, target = TinyLM.build("cpu", vocab=64, dim=8, batch=3, seq=10)
    model = model.double()
    logits = model(idx)
    expected = smoothed_cross_entropy(logits.flatten(0, 1), target.flatten(), TinyLM.SMOOTHING)
    torch.testing.assert_close(model(idx, target), expected, rtol=1e-12, atol=1e-12)


def test_spread_is_median_and_quartiles():
    # Quartiles interpolate between the sorted samples 0.9 1.0 1.05 1.1 1.2 5.0 at positions
    # (n - 1) p = 1.25, 2.5 and 3.75 (numpy's default; the outlier 5.0 moves none of them)
    s = timing.Spread.of([0.9, 1.0, 1.1, 1.2, 5.0, 1.05])
    assert (s.q1, s.median, s.q3) == pytest.approx((1.0125, 1.075, 1.175), rel=1e-12)
    assert s.n == 6
    assert s.relative == pytest.approx((1.175 - 1.0125) / 1.075, rel=1e-12)
    assert timing.Spread.of([3.0, 1.0]) == timing.Spread(2.0, 1.5, 2.5, 2)
    assert timing.Spread.of([2.0]) == timing.Spread(2.0, 2.0, 2.0, 1)
    with pytest.raises(ValueError, match="no samples"):
        timing.Spread.of([])


def test_ratio_only_when_both_spreads_allow_it():
    tight = timing.Spread.of([1.0, 1.01, 0.99, 1.0, 1.02])
    half = timing.Spread.of([0.5, 0.505, 0.495, 0.5, 0.51])
    value, low, high = timing.ratio(tight, half)
    assert value == pytest.approx(2.0)
    assert low == pytest.approx(tight.q1 / half.q3) and high == pytest.approx(tight.q3 / half.q1)
    assert low <= value <= high

    busy = timing.Spread.of([1.0, 0.3, 2.5, 1.0, 0.2])  # a loaded machine: steps several times apart
    assert busy.relative > timing.MAX_RELATIVE_SPREAD
    assert timing.ratio(tight, busy) is None and timing.ratio(busy, tight) is None
    assert busy.why_not_comparable() == f"IQR {busy.relative:.0%} of the median, a ratio needs under 25%"

    few = timing.Spread.of([1.0, 1.0])
    assert timing.ratio(tight, few) is None
    assert few.why_not_comparable() == f"2 timed steps, a spread needs {timing.MIN_SAMPLES}"
    assert tight.why_not_comparable() is None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_log_prints_what_is_shown_and_nothing_per_step():
    log = io.StringIO()
    bar = Progress(4, "run", stream=log)
    bar.show("starting")
    for _ in range(4):
        bar.advance("step")
    bar.show("done")
    bar.close()
    lines = log.getvalue().splitlines()
    assert [l.split("]")[0] for l in lines] == ["run [" + "." * 24, "run [" + "#" * 24]
    assert re.search(r"\] 0/4 \d+:\d\d  starting$", lines[0]) and re.search(r"\] 4/4 \d+:\d\d  done$", lines[1])


def test_progress_on_a_terminal_redraws_one_line():
    term = _Terminal()
    bar = Progress(2, stream=term)
    bar.advance("a")
    bar.advance("b")
    bar.close()
    out = term.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n") and "\n" not in out[:-1]
    assert re.search(r"\] 2/2 \d+:\d\d  b *$", out.split("\r")[-1].rstrip("\n"))
