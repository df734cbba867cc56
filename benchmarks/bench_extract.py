"""Benchmark: the SVD of dense weight differences (extraction), ours against the dense-SVD extractors - time per
layer and how close each gets to the best rank-k.

On random "fine-tune differences" of SD1.5 and Flux.1 layer shapes (float32, as a bf16/fp16 checkpoint's
difference is; a power-law spectrum over 256 directions plus Gaussian noise whose bulk reaches the middle of it: a
decaying spectrum, not pure noise), for each rank k:

- ours: core.dense.decompose_dense(W, need=k) then its rank-k factors (float64; the fast route when its certificate
  holds, else the exact one), with the certified excess it reports;
- svd32: sd-scripts networks/extract_lora_from_models.py (`svd`) and ComfyUI's "Extract and Save Lora"
  (comfy_extras/nodes_lora_extract.py, `extract_lora`) algorithm: one dense torch.linalg.svd per layer in float32,
  up = U_k diag(S_k), down = Vh_k, then both clamped to +-(the 0.99 quantile of their entries' signed values):
  the `clamp` column, re-stated from that description; also without the clamp (`noclamp`); full_matrices=False
  here (they take the full U and Vh: slower, the same factors);
- lowrank: torch.svd_lowrank(W, q=min(2k, m, n), niter=2), sd-scripts' newer option (networks/resize_lora.py,
  PR #2240: `--svd_lowrank_niter`, default 2), truncated to k.

Error: the relative excess err_k / best_k - 1, err_k = ||W - W_k||_F^2 in float64, best_k = ||W||_F^2 - sum of the
k leading singular values squared (the float64 Gram + eigh values, which tests/unit/core/test_dense.py checks
against numpy's float64 SVD). Times: the decomposition and the rank-k factors, per layer; totals per method.

    python benchmarks/bench_extract.py                  # SD1.5 shapes + Flux 3072x3072 (one layer each), k = 32 64 128
    python benchmarks/bench_extract.py --full           # + Flux 12288x3072, 3072x12288, 21504x3072 (about 30 min
                                                        #   on 2 cores: the dense SVDs of the baseline dominate)
    python benchmarks/bench_extract.py --quick          # CI size: SD1.5 shapes only, k = 32
    python benchmarks/bench_extract.py --cases flux --full --ranks 64
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from lora_resize.core.decompose import sym_gram
from lora_resize.core.dense import decompose_dense

SHAPES = {
    "sd15": [(320, 320), (640, 640), (1280, 1280), (1280, 5120), (5120, 1280), (320, 2880)],  # last: conv 3x3
    "flux": [(3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072)],
}
DEFAULT_FLUX = 1  # shapes of the Flux list in the default run (--full: all)
CLAMP_QUANTILE = 0.99  # sd-scripts' and ComfyUI's default
SIGNAL_RANK, DECAY = 256, 0.8


def finetune_diff(m: int, n: int, seed: int) -> torch.Tensor:
    """float32 (m, n): sum_i s_i a_i b_i^T with s_i = (1 + i)^-DECAY over SIGNAL_RANK random directions, plus noise
    whose spectrum's top is half the signal's value at SIGNAL_RANK / 2."""
    g = torch.Generator().manual_seed(seed)
    r = min(SIGNAL_RANK, m, n)
    A = torch.randn(m, r, generator=g) / math.sqrt(m)
    B = torch.randn(n, r, generator=g) / math.sqrt(n)
    s = (1.0 + torch.arange(r)) ** -DECAY
    sigma = 0.5 * float(s[r // 2]) / (math.sqrt(m) + math.sqrt(n))
    return (A * s) @ B.T + sigma * torch.randn(m, n, generator=g)


def reference_values(W: torch.Tensor) -> np.ndarray:
    X = W.double()
    X = X if X.shape[0] <= X.shape[1] else X.T
    w = torch.linalg.eigvalsh(sym_gram(X)).flip(0).numpy()
    return np.sqrt(np.clip(w, 0, None))


def sq_error(W64: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    return float(((W64 - up.double() @ down.double()) ** 2).sum())


def ours(W: torch.Tensor, k: int):
    dec = decompose_dense(W, need=k)
    U, S, Vh = dec.factors(k)
    route = "exact" if dec.complete and not dec.fallback else ("fallback" if dec.fallback else "fast")
    return U * S, Vh, route, dec.excess


def svd32(W: torch.Tensor):
    return torch.linalg.svd(W.float(), full_matrices=False)


def their_factors(U, S, Vh, k: int, clamp: bool):
    up, down = U[:, :k] * S[:k], Vh[:k]
    if clamp:
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), CLAMP_QUANTILE)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up, down


def lowrank(W: torch.Tensor, k: int):
    m, n = W.shape
    U, S, V = torch.svd_lowrank(W.float(), q=min(2 * k, m, n), niter=2)
    return U[:, :k] * S[:k], V[:, :k].T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sd15,flux", help="comma list of: sd15, flux")
    ap.add_argument("--ranks", default="32,64,128")
    ap.add_argument("--quick", action="store_true", help="SD1.5 shapes only, rank 32")
    ap.add_argument("--full", action="store_true", help="every Flux shape (default: 3072x3072 only)")
    args = ap.parse_args()
    cases = ["sd15"] if args.quick else args.cases.split(",")
    ranks = [32] if args.quick else [int(r) for r in args.ranks.split(",")]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; ranks {ranks}")
    print(f"\n{'case':5} {'shape':>11} {'k':>4} | {'ours s':>7} {'route':>8} {'certified':>9} {'excess':>9} | "
          f"{'svd32 s':>7} {'clamp':>9} {'noclamp':>9} | {'lowrank s':>9} {'excess':>9}")
    totals = {"ours": 0.0, "svd32": 0.0, "lowrank": 0.0}
    worst = {"ours": 0.0, "clamp": 0.0, "noclamp": 0.0, "lowrank": 0.0}
    start = time.perf_counter()
    for case in cases:
        shapes = SHAPES[case] if args.full or case != "flux" else SHAPES[case][:DEFAULT_FLUX]
        for i, (m, n) in enumerate(shapes):
            W = finetune_diff(m, n, seed=i)
            W64 = W.double()
            S_ref = reference_values(W)
            total = float((W64 * W64).sum())
            t = time.perf_counter()
            U, S, Vh = svd32(W)
            t_svd = time.perf_counter() - t  # one SVD serves every k: counted once per layer and rank below
            for k in ranks:
                best = total - float(np.sum(S_ref[:k] ** 2))
                t = time.perf_counter()
                up, down, route, certified = ours(W, k)
                t_ours = time.perf_counter() - t
                e_ours = sq_error(W64, up, down) / best - 1
                t = time.perf_counter()
                upc, downc = their_factors(U, S, Vh, k, clamp=True)
                t_clamp = time.perf_counter() - t
                e_clamp = sq_error(W64, upc, downc) / best - 1
                e_noclamp = sq_error(W64, *their_factors(U, S, Vh, k, clamp=False)) / best - 1
                t = time.perf_counter()
                upl, downl = lowrank(W, k)
                t_low = time.perf_counter() - t
                e_low = sq_error(W64, upl, downl) / best - 1
                totals["ours"] += t_ours
                totals["svd32"] += t_svd + t_clamp
                totals["lowrank"] += t_low
                for key, e in (("ours", e_ours), ("clamp", e_clamp), ("noclamp", e_noclamp), ("lowrank", e_low)):
                    worst[key] = max(worst[key], e)
                print(f"{case:5} {m:>5}x{n:<5} {k:>4} | {t_ours:7.2f} {route:>8} {certified:9.1e} {e_ours:9.1e} | "
                      f"{t_svd + t_clamp:7.2f} {e_clamp:9.1e} {e_noclamp:9.1e} | {t_low:9.2f} {e_low:9.1e}",
                      flush=True)
    print(f"\ntotal seconds: ours {totals['ours']:.1f}, svd32 {totals['svd32']:.1f} "
          f"(x{totals['svd32'] / max(totals['ours'], 1e-9):.1f} ours), lowrank {totals['lowrank']:.1f} "
          f"(x{totals['lowrank'] / max(totals['ours'], 1e-9):.2f} ours)")
    print(f"worst relative excess over the best rank-k squared error: ours {worst['ours']:.1e} (certified <= 1e-3 "
          f"or exact), svd32+clamp {worst['clamp']:.1e}, svd32 {worst['noclamp']:.1e}, lowrank {worst['lowrank']:.1e}")
    print(f"(wall {time.perf_counter() - start:.0f} s including the float64 references)")


if __name__ == "__main__":
    main()
