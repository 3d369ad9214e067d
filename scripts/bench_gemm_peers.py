"""The peers of `cargo bench --bench gemm`: f32 GEMM GFLOP/s of PyTorch (MKL) and NumPy (its
OpenBLAS) on the shapes of the small GPT's step, best of 20, on every thread. Run by
scripts/bench_train.sh with the fixture venv; prints one line per library."""
import time

import numpy as np
import torch

SHAPES = [(2048, 384, 1536), (2048, 1536, 384), (2048, 384, 384)]


def best(f):
    f()
    t = float("inf")
    for _ in range(20):
        s = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - s)
    return t


for name, make in [("PyTorch (MKL)", torch.randn), ("NumPy (OpenBLAS)", lambda *s: np.random.randn(*s).astype(np.float32))]:
    rates = []
    for m, k, n in SHAPES:
        a, b = make(m, k), make(k, n)
        rates.append(2 * m * k * n / best(lambda: a @ b) / 1e9)
    print(f"  {name:<18} " + "  ".join(f"{m}x{k}x{n}: {r:6.1f}" for (m, k, n), r in zip(SHAPES, rates)) + " GFLOP/s")
