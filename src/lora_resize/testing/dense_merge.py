"""The dense judges of the merge methods: each method written from its paper's definition on dense float64 updates
tau_i (m x n), for the tests and the benchmarks to hold core/core_space.py's factor-only versions against. Written
independently of core/core_space.py (nothing imported from it), deliberately plain and slow: m x n matrices and
full SVDs.

Sources (the definitions followed, one per method):
- sum: sum_i tau_i.
- ties: TIES-Merging, Yadav et al., NeurIPS 2023, arXiv 2306.01708, Sec. 3 (trim to the top-k% magnitudes, elect
  the sign of the summed trimmed values, disjoint mean over the inputs agreeing with it).
- dare: DARE, Yu et al., ICML 2024, arXiv 2311.03099, Eq. 2 (drop each entry with probability 1 - density, rescale
  the kept by 1 / density), then the sum.
- magnitude_prune: PEFT's `magnitude_prune` (huggingface/peft, src/peft/utils/merge_utils.py, `magnitude_prune` and
  `magnitude_based_pruning`): keep the top-k magnitudes of each input, then the (already weighted) sum, no rescale.
- tsv: Task Singular Vectors, Gargiulo et al., CVPR 2025, arXiv 2412.00081, Sec. 4 (TSV-Merge: each task's leading
  singular triplets, the concatenated singular vectors decorrelated by their orthogonal polar factor, Eq. 5-7; on
  their numerical range, the documented choice where inputs share directions and the polar factor is not unique).
- iso: Iso-C, Marczak et al., ICML 2025, arXiv 2502.04959, Sec. 4 (the sum's singular values all replaced by
  their mean, the nuclear norm kept).
The weights w_i are already in tau_i (the papers' scaling coefficient lambda is the weights).

`dense_core_bases` is the canonical core space of lora-resize (README: Merge methods): U, V the left / right
singular vectors of [tau_1 | ... | tau_T] and [tau_1; ...; tau_T] at their numerical rank, each vector's entry of
largest magnitude made positive. The elementwise methods (ties, dare, magnitude_prune) are applied to the cores
U^T tau_i V there, so their judge is `U @ dense_merge(method, [U^T tau_i V for i]) @ V^T`."""
from __future__ import annotations

import hashlib
import math

import torch

DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5, "magnitude_prune": 0.5}


def numerical_rank(s: torch.Tensor, m: int, n: int) -> int:
    """How many singular values s (descending) exceed max(m, n) * eps(float64) * s[0] (0 for an empty or zero s)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > max(m, n) * torch.finfo(torch.float64).eps * s[0]).sum())


def signed(basis: torch.Tensor) -> torch.Tensor:
    """basis (k x r) with each column's entry of largest magnitude made positive (the first such entry on a tie)."""
    if basis.shape[1] == 0:
        return basis
    idx = basis.abs().argmax(dim=0)  # argmax returns the first maximal index
    sign = torch.where(basis[idx, torch.arange(basis.shape[1])] < 0, -1.0, 1.0).to(basis.dtype)
    return basis * sign


def dense_core_bases(taus: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical reference bases of dense updates taus (each m x n): U (m x r), the left singular vectors of
    [tau_1 | ... | tau_T] (m x Tn); V (n x s), the right singular vectors of [tau_1; ...; tau_T] (Tm x n); each
    kept at its numerical rank (values > max(m, n) * eps64 * largest) and sign-normalised (each vector's entry of
    largest magnitude positive). Float64. The cores are U^T tau_i V (r x s); tau_i = U (U^T tau_i V) V^T exactly.
    Core space: Panariello et al., NeurIPS 2025, arXiv 2509.17786 (there from the raw stacked factors)."""
    taus = [t.to(torch.float64) for t in taus]
    m, n = taus[0].shape
    u, su, _ = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
    _, sv, vh = torch.linalg.svd(torch.cat(taus, dim=0), full_matrices=False)
    return (signed(u[:, :numerical_rank(su, m, n)]), signed(vh[:numerical_rank(sv, m, n)].T))


def dare_seed(seed: int, name: str, index: int) -> int:
    """The generator seed of DARE's keep mask for input `index` of layer `name`: the first 63 bits of
    sha256('<seed>\\0<name>\\0<index>') (stable across processes and machines, unlike hash())."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def dare_mask(shape: tuple[int, ...], density: float, seed: int, name: str, index: int) -> torch.Tensor:
    """DARE's keep mask (bool, `shape`): each entry kept with probability density, drawn on the CPU generator
    seeded with dare_seed(seed, name, index) (torch.rand in float64 < density)."""
    gen = torch.Generator("cpu").manual_seed(dare_seed(seed, name, index))
    return torch.rand(shape, dtype=torch.float64, generator=gen) < density


def top_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """tau with all but its max(1, int(density * numel)) largest-|.| entries set to 0 (TIES' trim step,
    PEFT's magnitude_based_pruning)."""
    k = max(1, int(density * tau.numel()))
    flat = tau.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def _ties(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = torch.stack([top_magnitude(t, density) for t in taus])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _tsv(taus: list[torch.Tensor], density: float | None) -> torch.Tensor:
    m, n = taus[0].shape
    per = max(1, min(m, n) // len(taus) if density is None else math.floor(density * min(m, n)))
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        k = min(numerical_rank(s, m, n), per)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_hat, v_hat, sigma = torch.cat(us, dim=1), torch.cat(vs, dim=1), torch.cat(ss)
    if sigma.numel() == 0:
        return torch.zeros(m, n, dtype=torch.float64)

    def polar(x: torch.Tensor) -> torch.Tensor:
        # on x's numerical range (singular values above 1e-8 of the largest): the polar factor where x has full
        # column rank; where inputs share directions (the paper's polar factor is not unique) the partial isometry
        # on the range, the documented choice (README: Merge methods, tsv)
        p, s, qh = torch.linalg.svd(x, full_matrices=False)
        r = int((s > 1e-8 * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
        return p[:, :r] @ qh[:r]

    return polar(u_hat) @ torch.diag(sigma) @ polar(v_hat).T


def _iso(taus: list[torch.Tensor]) -> torch.Tensor:
    total = torch.stack(taus).sum(dim=0)
    m, n = total.shape
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    r = numerical_rank(s, m, n)
    if r == 0:
        return torch.zeros_like(total)
    return (u[:, :r] * s[:r].mean()) @ vh[:r]


def dense_merge(method: str, taus: list[torch.Tensor], *, density: float | None = None, seed: int = 0,
                masks: list[torch.Tensor] | None = None, name: str = "", positions: list[int] | None = None
                ) -> torch.Tensor:
    """The merged update of the dense weighted updates taus (each m x n, any float dtype; math in float64) by
    `method` ('sum', 'ties', 'dare', 'magnitude_prune', 'tsv', 'iso'; definitions and sources in the module
    docstring). density: the fraction kept (None: the method's default: ties 0.2, dare and magnitude_prune 0.5,
    tsv 1/T of min(m, n) directions per input; iso and sum read none). seed, name: DARE's masks are
    dare_mask(tau.shape, density, seed, name, p_i) for input i at place p_i among the merge's given inputs
    (`positions`; default i), unless `masks` (bool, one per input) gives them.
    Returns the m x n float64 merged update. Raises ValueError for an unknown method."""
    taus = [t.to(torch.float64) for t in taus]
    if method == "sum":
        return torch.stack(taus).sum(dim=0)
    if method in DEFAULT_DENSITY and density is None:
        density = DEFAULT_DENSITY[method]
    if method == "ties":
        return _ties(taus, density)
    if method == "magnitude_prune":
        return torch.stack([top_magnitude(t, density) for t in taus]).sum(dim=0)
    if method == "dare":
        if masks is None:
            places = range(len(taus)) if positions is None else positions
            masks = [dare_mask(tuple(t.shape), density, seed, name, p) for p, t in zip(places, taus)]
        return torch.stack([torch.where(k, t / density, torch.zeros_like(t)) for k, t in zip(masks, taus)]).sum(dim=0)
    if method == "tsv":
        return _tsv(taus, density)
    if method == "iso":
        return _iso(taus)
    raise ValueError(f"unknown merge method {method!r}")
