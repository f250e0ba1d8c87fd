"""What the demo and the benchmarks use to measure a training step: a tiny language model to train,
the peak memory of one step, the median and spread of step times, and a progress bar."""
