"""Side-by-side benchmarks shipped with the package (`velotune bench`), so they run from an installed wheel.

- train.py / worker.py: training speed, memory and utilisation, velotune against transformers + peft;
- loop.py / loop_worker.py: one plain transformers-style training loop over velotune's model and over
  transformers + peft;
- generation.py: decoding speed against transformers' `generate`;
- gpu_kernels.py: the Triton kernels against plain PyTorch at realistic shapes (a GPU check);
- assets.py (random checkpoints, synthetic data), flops.py and peak.py (FLOP counts, the machine's matmul
  throughput), memory.py, processes.py, report.py, machine.py: what they share.

Nothing here reads files outside the package besides the checkpoints and data it writes to its cache; results
go to ./benchmarks/results in a clone, else ./velotune-bench-results.
"""
