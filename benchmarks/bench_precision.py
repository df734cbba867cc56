"""Benchmark: could the engine's heavy products run in float32 and be *certified* per layer (issue 24)? For a
sample of layers, the engine's steps (core/decompose.py: Gram matrices, Cholesky, core K = R GB R^T, eigenvalues)
run in float64 and in float32; a rigorous bound E >= max_i |lam32_i - lam_i| on the float32 eigenvalues is
computed from quantities the float32 path has, and a layer is certified when (a) the rank its policy picks is the
same for every eigenvalue set within +-E and (b) the Davis-Kahan bound on the kept subspace is within the save
dtype's unit roundoff. Prints per setting how many layers pass, how loose E is (E / actual error), the decision
margins, and the per-step seconds float64 vs float32 (one thread).

    python benchmarks/bench_precision.py                   # both files (the blog's SD1.5 LoCon, Flux rank 128)
    python benchmarks/bench_precision.py --every 1 --only flux --json /tmp/prec.json

The bound (u = 2^-24, gamma_k = k u / (1 - k u); N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd
ed. 2002). A (m x r) is the up side, B (r x n) the down side, of dW or of dW^T when n < m, both exact in float32.
- Products, (3.13): |fl(X Y) - X Y| <= gamma_k |X| |Y| entrywise (k the inner dimension, any summation order, FMA or
  not), and || |X| |Y| ||_2 <= ||X||_F ||Y||_F. Grams: ||dGA|| <= gamma_m ||A||_F^2, ||dGB|| <= gamma_n ||B||_F^2
  (symmetrised by mirroring the lower triangle: a copy, no rounding; the entrywise bound is symmetric).
- Cholesky, Theorem 10.3: R~^T R~ = GA32 + dC, ||dC|| <= gamma_{r+1} ||R~||_F^2 (whenever it completes).
- Core, two products of inner dimension r, Lemma 3.3 (gamma_a + gamma_b + gamma_a gamma_b <= gamma_{a+b}):
  ||K32 - R~ GB32 R~^T|| <= gamma_{2r} ||R~||_F^2 ||GB32||_F (K32 mirrored as above).
- Combination (Weyl: |lam_i(X + F) - lam_i(X)| <= ||F||_2 for symmetric X, F, sorted eigenvalues):
  lam(R~ GB32 R~^T) vs lam(R~ GB R~^T): moved by ||R~||_2^2 ||dGB||; lam(R~ GB R~^T) = lam(GB^1/2 X' GB^1/2) with
  X' = R~^T R~ = GA + dGA + dC, vs lam(GB^1/2 GA GB^1/2) = lam(R GB R^T) = lam(K): moved by ||GB|| ||dGA + dC||,
  ||GB|| <= ||GB32||_F + ||dGB||. A wide or square A is its own R (exact): no dGA, dC terms, R~ = A.
  The float64 eigensolver on K32 (exact in float64) is backward stable: + 10 p 2^-53 ||K32||_F (p: core size).
  E = (||dGA|| + ||dC||)(||GB32||_F + ||dGB||) + ||R~||_F^2 ||dGB|| + ||dK|| + 10 p 2^-53 ||K32||_F, all 2-norms
  bounded by Frobenius norms. Self-check: the layers where max |lam32 - lam64| > E must be 0 (lam64: the engine's
  float64 eigenvalues, themselves within ~1e-13 lam0 of the exact ones, far below E).
Certificate (a): intervals [max(lam32 - E, 0), lam32 + E] fed through the policy's exact rule (ranks/policies.py,
choose_rank): sv_ratio p keeps S >= S0 / p (lam >= lam0 / p^2, lam0's own interval moving the threshold); sv_fro f
keeps the first k with cum_k >= (f - 1e-12)^2 total, i.e. (1 - g) cum_k >= g tail_k; the engine's numerical rank
(S >= ZERO_RELATIVE S0) and the cap enter as min(); the rank is certain when the lowest and highest possible ranks
agree. (b): sin theta <= E / (lam32_{k-1} - lam32_k - 2E) <= the save dtype's unit roundoff (fp16 2^-11, bf16 2^-8;
k = p: nothing dropped, 0). (b) is the core-space bound; the vectors would also carry Q = A R~^-1's loss of
orthogonality, so it is lenient. Decision margin: the largest per-eigenvalue uncertainty under which the float64
eigenvalues still give one rank (bisection on the same rule) - (a) passes about when E < margin.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from common import ensure_flux_lora, ensure_sd15_locon

from lora_resize.core.decompose import ZERO_RELATIVE, decompose, sym_gram
from lora_resize.formats import detect
from lora_resize.io.reader import open_tensor_file
from lora_resize.ranks.policies import choose_rank, get_policy

U32, U64 = 2.0 ** -24, 2.0 ** -53
SAVE_U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
STEPS = ("grams", "cholesky", "core", "eigvalsh")
FILES = {  # name: (file, builder, settings as (policy, param, cap)); the first setting is the headline
    "blog": ("sd15_locon_512_512.safetensors", lambda p: ensure_sd15_locon(p, 512, 512),
             [("sv_ratio", 128, 128), ("sv_fro", 0.9, None), ("sv_ratio", 4, None), ("fixed", None, 32)]),
    "flux": ("flux_128.safetensors", lambda p: ensure_flux_lora(p, 128),
             [("sv_fro", 0.9, 64), ("sv_ratio", 128, None), ("fixed", None, 32)]),
}


def gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def mirror(G: torch.Tensor) -> torch.Tensor:
    """G symmetric from its lower triangle (a copy: no rounding)."""
    return torch.tril(G) + torch.tril(G, -1).mT


def pipeline(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, times: dict):
    """The engine's steps in `dtype` (the eigenvalues always in float64): (lam descending, R, GB, K) or None when
    Cholesky fails; adds each step's seconds to `times`."""
    t0 = time.perf_counter()
    A, B = A.to(dtype), B.to(dtype)
    GA = mirror(sym_gram(A.mT)) if A.shape[0] > A.shape[1] else None
    GB = mirror(sym_gram(B))
    t1 = time.perf_counter()
    if GA is not None:
        L, info = torch.linalg.cholesky_ex(GA)
        if int(info):
            return None
        R = L.mT
    else:
        R = A
    t2 = time.perf_counter()
    K = mirror(R @ GB @ R.mT)
    t3 = time.perf_counter()
    lam = torch.linalg.eigvalsh(K.double()).flip(0).numpy()
    t4 = time.perf_counter()
    for step, dt in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        times[step] += dt
    return lam, R, GB, K


def bound(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, GB: torch.Tensor, K: torch.Tensor):
    """(E >= max_i |lam32_i - lam_i| (the module docstring's derivation), its terms), from the float32 path's R~,
    GB32, K32."""
    (m, r), n = A.shape, B.shape[1]
    fro2 = lambda X: float(X.double().square().sum())  # noqa: E731
    dGB = gamma(n) * fro2(B)
    R2 = fro2(R)
    GBf = fro2(GB) ** 0.5
    dX = gamma(m) * fro2(A) + gamma(r + 1) * R2 if m > r else 0.0
    dK = gamma(2 * r) * R2 * GBf
    eig = 10 * K.shape[0] * U64 * fro2(K) ** 0.5
    terms = {"GA+chol": dX * (GBf + dGB), "GB": R2 * dGB, "core": dK, "eig": eig}
    return sum(terms.values()) * (1 + 1e-9), terms  # 1e-9: the float64 norms' own rounding


def ratio_range(lo, hi, p):
    """(fewest, most) of the values with lam >= lam0 / p^2 possible for lam in [lo, hi] (lam0 always kept)."""
    return (1 + int(np.count_nonzero(lo[1:] >= hi[0] / p ** 2)),
            1 + int(np.count_nonzero(hi[1:] >= lo[0] / p ** 2)))


def reach_range(lo, hi, g):
    """(lowest, highest) first k with cum_k >= g * total, i.e. (1 - g) cum_k >= g tail_k, for x in [lo, hi]."""
    tail = lambda x: np.append(np.cumsum(x[::-1])[::-1][1:], 0.0)  # noqa: E731  sum of x[k:] for k = 1..p
    possible = (1 - g) * np.cumsum(hi) >= g * tail(lo)
    sure = (1 - g) * np.cumsum(lo) >= g * tail(hi)
    first = lambda c: int(np.argmax(c)) + 1 if c.any() else len(c) + 1  # noqa: E731
    return first(possible), first(sure)


def rank_range(lo, hi, name, param, cap, clamp=True):
    """Lowest and highest rank choose_rank's exact rule can give for eigenvalues in [lo, hi]; `clamp` False:
    without its clamp to the numerical rank (decompose zeroes S < ZERO_RELATIVE S0)."""
    limit = ratio_range(lo, hi, 1 / ZERO_RELATIVE) if clamp else (len(lo), len(lo))
    crit = {"sv_ratio": lambda: ratio_range(lo, hi, param),
            "sv_fro": lambda: reach_range(lo, hi, (param - 1e-12) ** 2),
            "sv_cumulative": lambda: reach_range(np.sqrt(lo), np.sqrt(hi), param - 1e-12),
            }.get(name, lambda: (len(lo), len(lo)))()
    c = cap if cap is not None else len(lo)
    return tuple(max(1, min(crit[i], limit[i], c)) for i in (0, 1))


def certain(lam, eps, setting, clamp=True) -> bool:
    lo, hi = rank_range(np.maximum(lam - eps, 0.0), lam + eps, *setting, clamp=clamp)
    return lo == hi


def margin(lam, setting) -> float:
    """The largest eps for which lam +- eps gives one rank (bisection in log scale), / lam0."""
    a, b = lam[0] * 1e-20, lam[0] * 10
    if not certain(lam, a, setting):
        return 0.0
    if certain(lam, b, setting):
        return float("inf")
    for _ in range(60):
        mid = (a * b) ** 0.5
        a, b = (mid, b) if certain(lam, mid, setting) else (a, mid)
    return a / lam[0]


def to_rank(lam, full, setting) -> int:
    S = np.sqrt(np.maximum(lam, 0.0))
    S[S < S[0] * ZERO_RELATIVE] = 0.0
    name, param, cap = setting
    return choose_rank(S, full, get_policy(name), param, cap, "exact").rank


def run_file(key: str, folder: Path, every: int, out: dict) -> None:
    fname, build, settings = FILES[key]
    src = build(folder / fname)
    reader = open_tensor_file(src)
    every_module = detect(reader.infos(), reader.metadata).modules
    modules = every_module[::every]
    t64, t32 = defaultdict(float), defaultdict(float)
    engine_s, rows, bad = 0.0, [], 0
    for mod in modules:
        layer = mod.load(reader)
        up, down = layer.up, layer.down
        save_u = SAVE_U.get(up.dtype, U32)
        t = time.perf_counter()
        lam64 = decompose(up, down, vectors=False).S ** 2
        engine_s += time.perf_counter() - t
        m, n = up.shape[0], down.shape[1]
        A, B = (down.T, up.T) if n < m else (up, down)
        l64 = {s: 0.0 for s in STEPS}
        l32 = dict(l64)
        p = len(lam64)
        lam64_mine = pipeline(A, B, torch.float64, l64)[0][:p]
        res = pipeline(A, B, torch.float32, l32)
        tt = time.perf_counter()
        torch.linalg.eigvalsh(res[3]) if res else None
        l32["eigvalsh float32 (unused)"] = time.perf_counter() - tt
        for s, v in l64.items():
            t64[s] += v
        for s, v in l32.items():
            t32[s] += v
        row = dict(name=mod.name, shape=[m, n, A.shape[1]], t64=sum(l64.values()),
                   t32=sum(v for s, v in l32.items() if s in STEPS), settings={})
        row["mine_vs_engine"] = float(np.abs(lam64_mine - lam64).max() / lam64[0])
        if res is None:
            row["cholesky_failed"] = True
            rows.append(row)
            continue
        lam32 = res[0][:p]
        E, terms = bound(A, B, *res[1:])
        actual = float(np.abs(lam32 - lam64).max())
        bad += actual > E
        row.update(E=E / lam64[0], top_term=max(terms, key=terms.get), actual=actual / lam64[0],
                   loose=E / max(actual, 1e-300))
        full = min(m, n)
        for setting in settings:
            k64, k32 = to_rank(lam64, full, setting), to_rank(lam32, full, setting)
            a = certain(lam32, E, setting)
            gap = lam32[k32 - 1] - lam32[k32] - 2 * E if k32 < p else float("inf")
            sin = 0.0 if k32 >= p else (E / gap if gap > 0 else float("inf"))
            row["settings"][str(setting)] = dict(k64=k64, k32=k32, a=a, b=sin <= save_u, sin=sin,
                                                 a_unclamped=certain(lam32, E, setting, clamp=False),
                                                 margin=margin(lam64, setting))
        rows.append(row)
    reader.close()
    n = len(rows)
    print(f"\n== {key}: {src.name}, {n} of {len(every_module)} layers (every {every}), save unit roundoff "
          f"{save_u:.1e}; engine decompose(vectors=False) float64: {engine_s:.2f} s")
    print(f"self-check: layers with max|lam32 - lam64| > E: {bad} (must be 0); float32 Cholesky failures: "
          f"{sum(r.get('cholesky_failed', False) for r in rows)}; my float64 steps vs the engine: max "
          f"{max(r['mine_vs_engine'] for r in rows):.1e} lam0")
    ok = [r for r in rows if "E" in r]
    loose = np.array([r["loose"] for r in ok])
    E_rel = np.median([r["E"] for r in ok])
    tot64 = sum(r["t64"] for r in rows)
    summary = {}
    for setting in settings:
        st = [r["settings"].get(str(setting)) for r in rows]
        st = [s for s in st if s]
        na, nb, nu = (sum(s[c] for s in st) for c in ("a", "b", "a_unclamped"))
        both = [r for r in ok if r["settings"][str(setting)]["a"] and r["settings"][str(setting)]["b"]]
        wrong = sum(s["a"] and s["k32"] != s["k64"] for s in st)
        differ = sum(s["k32"] != s["k64"] for s in st)
        save = sum(r["t64"] - r["t32"] for r in both)
        waste = sum(r["t32"] for r in rows if r not in both)
        name, param, cap = setting
        label = f"{name}{'' if param is None else ' ' + str(param)}{'' if cap is None else ' cap ' + str(cap)}"
        summary[label] = dict(layers=n, a=na, b=nb, both=len(both), fallback=n - len(both), differ=differ,
                              certified_wrong=wrong, save_share=save / tot64, net_share=(save - waste) / tot64)
        print(f"{label:22} {n} layers: (a) {na} ({nu} without the numerical-rank clamp), (b) {nb}, both {len(both)} -> fallback {n - len(both)}; E/actual "
              f"median {np.median(loose):.1e} min {loose.min():.1e}; margin/lam0 median "
              f"{np.median([s['margin'] for s in st]):.1e} vs E/lam0 median {E_rel:.1e}; uncertified float32 rank "
              f"differs: {differ}; certified but wrong: {wrong}; float64 time saved {save / tot64:.0%} "
              f"(net of float32 work on fallbacks {(save - waste) / tot64:+.0%})")
    tops = {t: sum(r["top_term"] == t for r in ok) for t in ("GA+chol", "GB", "core", "eig")}
    print(f"E's largest term (layers): {tops}")
    print(f"actual max|lam32 - lam64| / lam0: median {np.median([r['actual'] for r in ok]):.1e}, max "
          f"{max(r['actual'] for r in ok):.1e}")
    print(f"{'step (1 thread)':28} {'float64 s':>10} {'float32 s':>10} {'64/32':>7}")
    for s in (*STEPS, "eigvalsh float32 (unused)"):
        a, b = t64.get(s, 0.0), t32[s]
        print(f"{s:28} {a:10.3f} {b:10.3f} {a / b if a and b else float('nan'):7.2f}")
    a, b = sum(t64[s] for s in STEPS), sum(t32[s] for s in STEPS)
    print(f"{'total':28} {a:10.3f} {b:10.3f} {a / b:7.2f}")
    out[key] = dict(summary=summary, t64=dict(t64), t32=dict(t32), engine_s=engine_s, layers=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    ap.add_argument("--every", type=int, default=3, help="sample every N-th layer")
    ap.add_argument("--only", choices=sorted(FILES), help="one file only")
    ap.add_argument("--json", help="write the per-layer figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    for key in ([args.only] if args.only else FILES):
        run_file(key, folder, args.every, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
