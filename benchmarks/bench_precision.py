"""Benchmark: could the engine's heavy products run in float32 and be *certified* per layer (issue 24)? The engine's
steps (core/decompose.py: Grams, Cholesky, core K = R GB R^T, eigenvalues) run in float64 and float32 on sampled
layers; a rigorous E >= max_i |lam32_i - lam_i| is computed from what the float32 path has; a layer is certified when
(a) its policy's rank is the same for all eigenvalues within +-E and (b) the Davis-Kahan bound on the kept subspace
is within the save dtype's unit roundoff. Prints per setting the layers that pass, E / actual error, the decision
margins, the actual difference of the rank-k approximations, and seconds per step float64 vs float32 (one thread).

    python benchmarks/bench_precision.py [--every N] [--only flux] [--json OUT]   # both files: blog LoCon, Flux

The bound (u = 2^-24, gamma_k = k u / (1 - k u); N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd
ed. 2002). A (m x r) is the up side, B (r x n) the down side, of dW or of dW^T when n < m, both exact in float32.
- Products, (3.13): |fl(X Y) - X Y| <= gamma_k |X| |Y| entrywise (k the inner dimension, any summation order),
  || |X| |Y| ||_2 <= ||X||_F ||Y||_F. Grams: ||dGA|| <= gamma_m ||A||_F^2, ||dGB|| <= gamma_n ||B||_F^2
  (symmetrised by mirroring the lower triangle: a copy, no rounding; the entrywise bound is symmetric).
- Cholesky, Thm 10.3 (any inner-product order): R~^T R~ = GA32 + dC, ||dC|| <= gamma_{r+1} ||R~||_F^2 if it completes.
- Core, two products of inner dimension r, Lemma 3.3 (gamma_a + gamma_b + gamma_a gamma_b <= gamma_{a+b}):
  ||dK|| = ||K32 - R~ GB32 R~^T|| <= gamma_{2r} ||R~||_F^2 ||GB32||_F (K32 mirrored as above).
- Weyl (|lam_i(X + F) - lam_i(X)| <= ||F||_2, symmetric X, F, sorted): lam(R~ GB32 R~^T) vs lam(R~ GB R~^T): moved
  by ||R~||_2^2 ||dGB||; lam(R~ GB R~^T) = lam(GB^1/2 X' GB^1/2), X' = R~^T R~ = GA + dGA + dC, vs
  lam(GB^1/2 GA GB^1/2) = lam(K): by ||GB|| ||dGA + dC||, ||GB|| <= ||GB32||_F + ||dGB||. A wide or square A is
  its own R (exact): no dGA, dC, R~ = A. The float64 eigensolver on K32 is backward stable: 10 p 2^-53 ||K32||_F.
  E = (||dGA|| + ||dC||)(||GB32||_F + ||dGB||) + ||R~||_F^2 ||dGB|| + ||dK|| + 10 p 2^-53 ||K32||_F (p: core size).
  Self-check: no layer may have max |lam32 - lam64| > E (lam64, the engine's, is within ~1e-13 lam0 of exact).
(a): [max(lam32 - E, 0), lam32 + E] through choose_rank's exact rule (ranks/policies.py): sv_ratio p keeps lam >=
lam0 / p^2 (lam0's interval moves the threshold), sv_fro f the first k with (1 - g) cum_k >= g tail_k, g = (f -
1e-12)^2, then min() with the numerical rank (S >= ZERO_RELATIVE S0) and the cap: certain when the lowest and highest
possible ranks agree. (b): E / (lam32_{k-1} - lam32_k - 2E) <= unit roundoff (fp16 2^-11, bf16 2^-8; k = p: 0),
lenient (a tall A's cores live in different bases R, R~; the vectors also carry Q = A R~^-1's loss of orthogonality).
Decision margin: the largest per-eigenvalue uncertainty under which lam64 still gives one rank; (a) ~ E < margin.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
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
STEPS, EIG32 = ("grams", "cholesky", "core", "eigvalsh"), "eigvalsh in float32 (unused)"
FILES = {  # name: (file, builder, settings as (policy, param, cap)); the first setting is the headline
    "blog": ("sd15_locon_512_512.safetensors", lambda p: ensure_sd15_locon(p, 512, 512),
             [("sv_ratio", 128, 128), ("sv_fro", 0.9, None), ("sv_ratio", 4, None), ("fixed", None, 32)]),
    "flux": ("flux_128.safetensors", lambda p: ensure_flux_lora(p, 128),
             [("sv_fro", 0.9, 64), ("sv_ratio", 128, None), ("fixed", None, 32)])}
gamma = lambda k: k * U32 / (1 - k * U32)  # noqa: E731
mirror = lambda G: torch.tril(G) + torch.tril(G, -1).mT  # noqa: E731  symmetric from the lower triangle: no rounding


def pipeline(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, times: dict):
    """The engine's steps in `dtype`, eigenvalues in float64: (lam descending, R, GB, K), None if Cholesky fails."""
    t0 = time.perf_counter()
    A, B = A.to(dtype), B.to(dtype)
    GA = mirror(sym_gram(A.mT)) if A.shape[0] > A.shape[1] else None
    GB = mirror(sym_gram(B))
    t1 = time.perf_counter()
    L, info = torch.linalg.cholesky_ex(GA) if GA is not None else (A.mT, 0)
    if int(info):
        return None
    R, t2 = L.mT, time.perf_counter()
    K = mirror(R @ GB @ R.mT)
    t3 = time.perf_counter()
    lam = torch.linalg.eigvalsh(K.double()).flip(0).numpy()
    times.update({s: times[s] + dt for s, dt in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3))})
    return lam, R, GB, K


def bound(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, GB: torch.Tensor, K: torch.Tensor, lam0: float):
    """(E >= max_i |lam32_i - lam_i| (the module docstring), its largest term, the heuristic E', ||R~||_F^2 /
    ||R~||_2^2) from the float32 R~, GB32, K32. E' is NOT a bound: sqrt(k) u for gamma_k (Higham and Mary, SIAM J.
    Sci. Comput. 41(5), 2019, probabilistic), 2-norms for the |X||Y| and Frobenius norms."""
    (m, r), n = A.shape, B.shape[1]
    fro2 = lambda X: float(X.double().square().sum())  # noqa: E731
    dGB, R2, GBf = gamma(n) * fro2(B), fro2(R), fro2(GB) ** 0.5
    dX = gamma(m) * fro2(A) + gamma(r + 1) * R2 if m > r else 0.0
    terms = {"GA+chol": dX * (GBf + dGB), "GB": R2 * dGB, "core": gamma(2 * r) * R2 * GBf,
             "eig": 10 * K.shape[0] * U64 * fro2(K) ** 0.5}
    a2, g2 = (float(torch.linalg.matrix_norm(X.double(), 2)) ** e for X, e in ((R, 2), (GB, 1)))
    h = U32 * a2 * g2 * ((m ** 0.5 + (r + 1) ** 0.5 if m > r else 0.0) + n ** 0.5 + (2 * r) ** 0.5)
    E = sum(terms.values()) * (1 + 1e-9)  # 1e-9: the float64 norms' own rounding
    return E, max(terms, key=terms.get), h + 10 * K.shape[0] * U64 * lam0, R2 / a2


def ratio_range(lo, hi, p):
    """(fewest, most) of the values with lam >= lam0 / p^2 possible for lam in [lo, hi] (lam0 always kept)."""
    return 1 + int(np.count_nonzero(lo[1:] >= hi[0] / p ** 2)), 1 + int(np.count_nonzero(hi[1:] >= lo[0] / p ** 2))


def reach_range(lo, hi, g):
    """(lowest, highest) first k with cum_k >= g * total, i.e. (1 - g) cum_k >= g tail_k, for x in [lo, hi]."""
    tail = lambda x: np.append(np.cumsum(x[::-1])[::-1][1:], 0.0)  # noqa: E731  sum of x[k:] for k = 1..p
    first = lambda c: int(np.argmax(c)) + 1 if c.any() else len(c) + 1  # noqa: E731
    return first((1 - g) * np.cumsum(hi) >= g * tail(lo)), first((1 - g) * np.cumsum(lo) >= g * tail(hi))


def rank_range(lo, hi, name, param, cap, clamp=True):
    """Lowest and highest rank choose_rank's exact rule can give for eigenvalues in [lo, hi]; `clamp` False:
    without its clamp to the numerical rank (decompose zeroes S < ZERO_RELATIVE S0)."""
    p = len(lo)
    limit = ratio_range(lo, hi, 1 / ZERO_RELATIVE) if clamp else (p, p)
    crit = {"sv_ratio": lambda: ratio_range(lo, hi, param), "sv_fro": lambda: reach_range(lo, hi, (param - 1e-12) ** 2),
            "fixed": lambda: (p, p)}[name]()
    return tuple(max(1, min(crit[i], limit[i], p if cap is None else cap)) for i in (0, 1))


def certain(lam, eps, setting, clamp=True) -> bool:
    return len(set(rank_range(np.maximum(lam - eps, 0.0), lam + eps, *setting, clamp=clamp))) == 1


def margin(lam, setting) -> float:
    """The largest eps for which lam +- eps gives one rank, / lam0 (bisection in log scale between 1e-20 and 10)."""
    a, b = lam[0] * 1e-20, lam[0] * 10
    for _ in range(60):
        mid = (a * b) ** 0.5
        a, b = (mid, b) if certain(lam, mid, setting) else (a, mid)
    return a / lam[0]


def approx_diff(k: int, tall: bool, lam64, R64, GB64, K64, R32, K32) -> float:
    """||dW_k32 - dW_k64||_F / ||dW_k64||_F for the rank-k approximations the factors give, dW_k = A R^-1 W_k W_k^T
    R B (A not tall: W_k W_k^T A B), formed in float64 from each path's R and core eigenvectors W."""
    W64, W32 = (torch.linalg.eigh(K.double())[1].flip(-1)[:, :k] for K in (K64, K32))
    if not tall:  # ||D A B||_F^2 = tr(D^T D K)
        D = W32 @ W32.mT - W64 @ W64.mT
        return float((D.mT @ D @ K64).trace() / lam64[:k].sum()) ** 0.5
    X32, X64 = (torch.linalg.solve_triangular(R, W @ (W.mT @ R), upper=True) for R, W in ((R32.double(), W32),
                                                                                       (R64, W64)))
    D = X32 - X64  # ||A D B||_F^2 = tr(D^T GA D GB)
    return float((D.mT @ (R64.mT @ R64) @ D @ GB64).trace() / lam64[:k].sum()) ** 0.5


def to_rank(lam, full, setting) -> int:
    S = np.sqrt(np.maximum(lam, 0.0))
    S[S < S[0] * ZERO_RELATIVE] = 0.0  # as decompose does
    return choose_rank(S, full, get_policy(setting[0]), setting[1], setting[2], "exact").rank


def measure(mod, reader, settings, t64: dict, t32: dict) -> dict:
    """One layer's figures: both pipelines (step seconds added to t64/t32), E, the certificates per setting."""
    up, down = (layer := mod.load(reader)).up, layer.down
    lam64 = decompose(up, down, vectors=False).S ** 2
    m, n = up.shape[0], down.shape[1]
    A, B = (down.T, up.T) if n < m else (up, down)
    p, l64, l32 = len(lam64), dict.fromkeys(STEPS, 0.0), dict.fromkeys(STEPS, 0.0)
    res64, res = pipeline(A, B, torch.float64, l64), pipeline(A, B, torch.float32, l32)
    t, _ = time.perf_counter(), res and torch.linalg.eigvalsh(res[3])
    l32[EIG32] = time.perf_counter() - t  # a float32 eigensolver's time (unused: K32's eigenvalues are float64's)
    t64.update({s: t64[s] + v for s, v in l64.items()})
    t32.update({s: t32[s] + v for s, v in l32.items()})
    row = dict(name=mod.name, mnr=[m, n, A.shape[1]], t64=sum(l64.values()), t32=sum(l32[s] for s in STEPS),
               save_u=SAVE_U.get(up.dtype, U32), mine_vs_engine=float(np.abs(res64[0][:p] - lam64).max() / lam64[0]))
    if res is None:
        return row | dict(cholesky_failed=True)
    lam32 = res[0][:p]
    E, top, Eh, srank = bound(A, B, *res[1:], lam0=float(lam32[0]))
    actual = float(np.abs(lam32 - lam64).max())
    row |= dict(E=E / lam64[0], Eh=Eh / lam64[0], top=top, srank=srank, actual=actual / lam64[0], settings={},
                loose=E / max(actual, 1e-300))
    for setting in settings:
        k32, k64 = to_rank(lam32, min(m, n), setting), to_rank(lam64, min(m, n), setting)
        gaps = [lam32[k32 - 1] - lam32[k32] - 2 * e if k32 < p else np.inf for e in (E, Eh)]
        sin = [0.0 if g == np.inf else e / g if g > 0 else np.inf for e, g in zip((E, Eh), gaps)]
        a, ah = certain(lam32, E, setting), certain(lam32, Eh, setting)
        b, bh = (bool(x <= row["save_u"]) for x in sin)
        row["settings"][str(setting)] = dict(
            k64=k64, k32=k32, sin=sin[0], margin=margin(lam64, setting), a=a, b=b, both=a and b,
            a_noclamp=certain(lam32, E, setting, clamp=False), ah=ah, bh=bh, both_h=ah and bh, differ=k32 != k64,
            certified_wrong=a and k32 != k64)
    k = row["settings"][str(settings[0])]["k64"]
    row["diff"] = approx_diff(k, A.shape[0] > A.shape[1], lam64, *res64[1:], res[1], res[3]) if k < p else 0.0
    return row


def run_file(key: str, folder: Path, every: int, out: dict) -> None:
    fname, build, settings = FILES[key]
    reader = open_tensor_file(src := build(folder / fname))
    modules = detect(reader.infos(), reader.metadata).modules
    t64, t32, t = defaultdict(float), defaultdict(float), time.perf_counter()
    rows = [measure(mod, reader, settings, t64, t32) for mod in modules[::every]]
    reader.close()
    ok = [r for r in rows if "E" in r]
    n, tot64 = len(rows), sum(r["t64"] for r in rows)
    med = lambda key: float(np.median([r[key] for r in ok]))  # noqa: E731
    print(f"\n== {key}: {src.name}, {n} of {len(modules)} layers (every {every}), save unit roundoff "
          f"{rows[0]['save_u']:.1e} ({time.perf_counter() - t:.0f} s)")
    print(f"self-check: layers with max|lam32 - lam64| > E: {sum(r['actual'] > r['E'] for r in ok)} (must be 0); "
          f"float32 Cholesky failures: {n - len(ok)}; these float64 steps vs the engine: max "
          f"{max(r['mine_vs_engine'] for r in rows):.1e} lam0")
    print(f"max|lam32 - lam64| / lam0 median {med('actual'):.1e} max {max(r['actual'] for r in ok):.1e}; E / lam0 "
          f"median {med('E'):.1e}; E / actual median {med('loose'):.1e} min {min(r['loose'] for r in ok):.1e}; "
          f"largest term of E: {dict(Counter(r['top'] for r in ok))}; ||R~||_F^2 / ||R~||_2^2 median "
          f"{med('srank'):.0f}; heuristic E' / lam0 median {med('Eh'):.1e}, actual > E': "
          f"{sum(r['actual'] > r['Eh'] for r in ok)}")
    summary = {}
    for setting in settings:
        st = [r["settings"][str(setting)] for r in ok]
        kept = [r for r, s in zip(ok, st) if s["both"]]
        save, waste = sum(r["t64"] - r["t32"] for r in kept), sum(r["t32"] for r in rows if r not in kept)
        label = " ".join(str(v) for v in (setting[0], setting[1], setting[2] and f"cap {setting[2]}") if v)
        d = summary[label] = {c: sum(bool(s[c]) for s in st) for c, v in st[0].items() if isinstance(v, bool)}
        d |= dict(layers=n, fallback=n - len(kept), save_share=save / tot64, net_share=(save - waste) / tot64,
                  margin_median=float(np.median([s["margin"] for s in st])))
        print(f"{label:20} (a) {d['a']} ({d['a_noclamp']} without the numerical-rank clamp), (b) {d['b']}, both "
              f"{d['both']} -> fallback {d['fallback']} of {n}; margin / lam0 median {d['margin_median']:.1e} vs E "
              f"/ lam0 {med('E'):.1e}; float32 rank differs (uncertified) {d['differ']}, certified but wrong "
              f"{d['certified_wrong']}; float64 time saved {d['save_share']:.0%} (net {d['net_share']:+.0%}); "
              f"with E' (heuristic): (a) {d['ah']}, (b) {d['bh']}, both {d['both_h']}")
    sin = np.median([r["settings"][str(settings[0])]["sin"] for r in ok])
    print(f"{next(iter(summary))}: actual ||dW_k32 - dW_k64||_F / ||dW_k64||_F median {med('diff'):.1e} max "
          f"{max(r['diff'] for r in ok):.1e} vs (b)'s sin theta bound median {sin:.1e} (unit roundoff "
          f"{ok[0]['save_u']:.1e})")
    print(f"{'step (1 thread)':28} {'float64 s':>10} {'float32 s':>10} {'64/32':>6}")
    t64["total"], t32["total"] = sum(t64[x] for x in STEPS), sum(t32[x] for x in STEPS)
    for s in (*STEPS, EIG32, "total"):
        print(f"{s:28} {t64[s]:10.3f} {t32[s]:10.3f} {t64[s] / t32[s] if t64[s] else float('nan'):6.2f}")
    out[key] = dict(summary=summary, t64=dict(t64), t32=dict(t32), layers=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora-resize-bench"))
    ap.add_argument("--every", type=int, default=1, help="every N-th layer only (1: all, ~2.5 min here)")
    ap.add_argument("--only", choices=sorted(FILES), help="one file only")
    ap.add_argument("--json", help="write the per-layer figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    out = {}
    for key in [args.only] if args.only else FILES:
        run_file(key, Path(args.dir), args.every, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
