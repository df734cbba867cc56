"""The maths of the merge methods (core/merging.py is their registry): the weighted sum as stacked factors, and the
core space of the stacked factors in which the other methods work (Panariello et al., arXiv 2509.17786)."""
from __future__ import annotations

import hashlib
import math

import torch

from ..errors import LoraStructureError, NumericalError
from .decompose import NAN_MESSAGE
from .layer import LowRankLayer

CANCELLED = 1e-10  # a merged update this small next to its inputs' is rounding noise (float64: ~1e-16)


def check_shapes(name: str, parts: list[tuple[float, LowRankLayer]]) -> None:
    """LoraStructureError naming the layer when the inputs' layers differ in out x in or kernel."""
    first = parts[0][1]
    for _, layer in parts:
        if (layer.up.shape[0], layer.down.shape[1], layer.kernel) != (first.up.shape[0], first.down.shape[1],
                                                                       first.kernel):
            raise LoraStructureError(
                f"layer {name} has different shapes in the inputs: out x in {first.up.shape[0]} x "
                f"{first.down.shape[1]} (kernel {first.kernel}) vs {layer.up.shape[0]} x {layer.down.shape[1]} "
                f"(kernel {layer.kernel}); these LoRAs are for different models")


def finite_inputs(name: str, parts: list[tuple[float, LowRankLayer]], files: list[str] | None = None) -> None:
    """NumericalError naming the layer (and the input's file, `files[i]` for parts[i], when given) when an input's
    factors hold NaN or Inf: checked before any method decomposes them (an SVD of NaN does not converge)."""
    for i, (_, layer) in enumerate(parts):
        factors = (t if t.element_size() > 1 else t.float() for t in (layer.up, layer.down))  # fp8: no isfinite
        if not all(bool(torch.isfinite(t).all()) for t in factors):
            where = f" in {files[i]}" if files is not None else ""
            raise NumericalError(f"layer {name}{where} {NAN_MESSAGE}")


def stacked(name: str, parts: list[tuple[float, LowRankLayer]], cancelled: list[str] | None = None
            ) -> LowRankLayer:
    """One low-rank layer for sum_i w_i * scale_i * up_i @ down_i (shapes checked; LoraStructureError when they
    differ), in float64, with scale 1. When the weighted inputs cancel out (the sum, probed with four fixed random
    vectors, is below CANCELLED x sum_i |w_i scale_i| ||up_i||_F ||down_i||_F: a LoRA minus itself, a module two
    checkpoints left untrained), the layer comes back as exact zeros and its name is appended to `cancelled`."""
    check_shapes(name, parts)
    first = parts[0][1]
    ups = [layer.up.to(torch.float64) * (w * layer.scale) for w, layer in parts]
    downs = [layer.down.to(torch.float64) for _, layer in parts]
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    if len(parts) > 1:
        bound = sum(float(torch.linalg.vector_norm(u)) * float(torch.linalg.vector_norm(d)) for u, d in zip(ups, downs))
        probe = torch.randn(down.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        if bound > 0 and float(torch.linalg.vector_norm(up @ (down @ probe.to(down.device)))) / 2 <= CANCELLED * bound:
            up = torch.zeros_like(up)
            if cancelled is not None:
                cancelled.append(name)
    return LowRankLayer.with_alpha(up, down, None, kernel=first.kernel, in_channels=first.in_channels)


def summed(name: str, parts: list[tuple[float, LowRankLayer]], settings, positions: list[int] | None = None
           ) -> LowRankLayer:
    """The `sum` method: `stacked` (MergeMethod.combine's signature; `settings`, a core.merging.MergeSettings,
    unread)."""
    return stacked(name, parts)


# ---- the core space: canonical bases and cores from the factors (Panariello et al., arXiv 2509.17786) ----------

def _rank(s: torch.Tensor, m: int, n: int) -> int:
    """How many of the descending singular values s exceed max(m, n) * eps(float64) * s[0] (the numerical rank of
    an m x n update)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > max(m, n) * torch.finfo(torch.float64).eps * s[0]).sum())


def _positive_peaks(basis: torch.Tensor) -> torch.Tensor:
    """basis (k x r) with each column's entry of largest magnitude made positive (the first on a tie): the sign
    convention that makes the singular vectors, and so the cores, one canonical choice."""
    if basis.shape[1] == 0:
        return basis
    peak = basis.gather(0, basis.abs().argmax(dim=0, keepdim=True))
    return basis * torch.where(peak < 0, -1.0, 1.0).to(basis.dtype)


def _left_singular(cols: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The left singular vectors (k x rank, sign-normalised) of a tall matrix cols (k x f, f small) at its
    numerical rank for an m x n update: QR of cols, then the SVD of its f x f triangle (never a k x k matrix)."""
    q, r = torch.linalg.qr(cols)
    a, s, _ = torch.linalg.svd(r)
    return _positive_peaks(q @ a[:, :_rank(s, m, n)])


def core_bases(parts: list[tuple[float, LowRankLayer]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical reference bases of the weighted updates tau_i = w_i s_i B_i A_i (parts: [(w_i, layer_i)],
    B_i = up (m x r_i), A_i = down (r_i x n)), from the factors only: U (m x p), the left singular vectors of
    [tau_1 | ... | tau_T], and V (n x q), the right singular vectors of [tau_1; ...; tau_T], each at its numerical
    rank (values > max(m, n) * eps64 * largest), each vector's entry of largest magnitude positive. Float64, on the
    inputs' device. With A_i^T = Q_i R_i, [tau_1 | ...] = [w_1 s_1 B_1 R_1^T | ...] blockdiag(Q_i^T), whose second
    factor has orthonormal rows, so U is the left singular vectors of the m x sum(r_i) matrix [w_i s_i B_i R_i^T];
    likewise V with B_i = P_i S_i. U and V depend on the updates only, not on how they are factored (up*c, down/c
    gives the same). Panariello et al. (arXiv 2509.17786) take the bases of the raw stacked factors: the same
    spaces, another basis within them."""
    first = parts[0][1]
    m, n = first.up.shape[0], first.down.shape[1]
    lefts, rights = [], []
    for w, layer in parts:
        up, down = layer.up.to(torch.float64) * (w * layer.scale), layer.down.to(torch.float64)
        lefts.append(up @ torch.linalg.qr(down.T)[1].T)
        rights.append(down.T @ torch.linalg.qr(up)[1].T)
    return _left_singular(torch.cat(lefts, dim=1), m, n), _left_singular(torch.cat(rights, dim=1), m, n)


def cores(parts: list[tuple[float, LowRankLayer]], u: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """Each input's core M_i = U^T tau_i V = w_i s_i (U^T B_i)(A_i V) (p x q, float64), from the factors."""
    return [(u.T @ layer.up.to(u)) @ (layer.down.to(v) @ v) * (w * layer.scale) for w, layer in parts]


def _from_core(parts: list[tuple[float, LowRankLayer]], u: torch.Tensor, core: torch.Tensor, v: torch.Tensor
               ) -> LowRankLayer:
    """The layer U @ core @ V^T (up = U core, down = V^T, scale 1); exact zeros of rank 1 when the core is zero
    (everything trimmed or cancelled) or empty (every input zero)."""
    first = parts[0][1]
    m, n = first.up.shape[0], first.down.shape[1]
    if core.numel() == 0 or not bool(core.any()):
        up, down = torch.zeros(m, 1, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
        up, down = up.to(first.up.device), down.to(first.down.device)
    else:
        up, down = u @ core, v.T.contiguous()
    return LowRankLayer.with_alpha(up, down, None, kernel=first.kernel, in_channels=first.in_channels)


def _in_core_space(parts: list[tuple[float, LowRankLayer]], merge) -> LowRankLayer:
    """The layer U merge([M_1, ..., M_T]) V^T: `merge` (a list of p x q cores -> the merged p x q core) applied in
    the canonical core space. A merged core below CANCELLED x sum_i ||M_i||_F (inputs that cancel, e.g. 0.5 a +
    0.5 a - a, whose rounding noise a method such as iso would otherwise keep as directions) is exact zeros."""
    u, v = core_bases(parts)
    if not (u.shape[1] and v.shape[1]):
        return _from_core(parts, u, torch.zeros(u.shape[1], v.shape[1], dtype=torch.float64), v)
    ms = cores(parts, u, v)
    merged = merge(ms)
    if float(torch.linalg.vector_norm(merged)) <= CANCELLED * sum(float(torch.linalg.vector_norm(m)) for m in ms):
        merged = torch.zeros_like(merged)
    return _from_core(parts, u, merged, v)


def trimmed(core: torch.Tensor, density: float) -> torch.Tensor:
    """core with all but its max(1, int(density * numel)) largest-|.| entries set to zero (TIES' trim, PEFT's
    magnitude_based_pruning)."""
    flat = core.reshape(-1)
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    keep[flat.abs().topk(max(1, int(density * flat.numel()))).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(core.shape)


def ties(name: str, parts: list[tuple[float, LowRankLayer]], settings, positions: list[int] | None = None
         ) -> LowRankLayer:
    """TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708) on the cores: trim each core to its top
    `density` fraction of magnitudes, elect each entry's sign as the sign of the trimmed cores' sum, and take the
    mean of the trimmed entries that are nonzero and of the elected sign (0 where none). Elementwise, so it depends
    on the basis: the canonical core space's (README: Merge methods), not the paper's on the weights."""
    density = settings.value("density")

    def merge(ms: list[torch.Tensor]) -> torch.Tensor:
        t = torch.stack([trimmed(c, density) for c in ms])
        agree = (t != 0) & (torch.sign(t) == torch.sign(t.sum(dim=0)))
        count = agree.sum(dim=0)
        return torch.where(agree, t, torch.zeros_like(t)).sum(dim=0) / count.clamp(min=1)
    return _in_core_space(parts, merge)


def drop_seed(seed: int, name: str, index: int) -> int:
    """The CPU generator seed of DARE's mask for input `index` of layer `name`: the first 63 bits of
    sha256('<seed>\\0<name>\\0<index>') (the same on every machine and process, unlike hash())."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def dare(name: str, parts: list[tuple[float, LowRankLayer]], settings, positions: list[int] | None = None
         ) -> LowRankLayer:
    """DARE (Yu et al., ICML 2024, arXiv 2311.03099) on the cores: keep each entry of input i's core with
    probability `density` (mask: torch.rand(core.shape, float64, CPU generator seeded with
    drop_seed(seed, name, p_i)) < density, with p_i = positions[i], the input's place among the merge's given
    inputs (default i), so an input's masks do not move when another lacks the layer; reproducible on every
    machine and thread count), rescale the kept by 1 / density, and sum. Elementwise: in the canonical core space
    (README: Merge methods)."""
    density, seed = settings.value("density"), settings.value("seed")

    def merge(ms: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros_like(ms[0])
        for i, c in enumerate(ms):
            place = i if positions is None else positions[i]
            gen = torch.Generator("cpu").manual_seed(drop_seed(seed, name, place))
            keep = torch.rand(tuple(c.shape), dtype=torch.float64, generator=gen).to(c.device) < density
            out += torch.where(keep, c / density, torch.zeros_like(c))
        return out
    return _in_core_space(parts, merge)


def magnitude_prune(name: str, parts: list[tuple[float, LowRankLayer]], settings, positions: list[int] | None = None
                    ) -> LowRankLayer:
    """PEFT's magnitude_prune (huggingface/peft, src/peft/utils/merge_utils.py `magnitude_prune`) on the cores:
    trim each core to its top `density` fraction of magnitudes, then sum (no rescale). Elementwise: in the
    canonical core space (README: Merge methods)."""
    density = settings.value("density")
    return _in_core_space(parts, lambda ms: torch.stack([trimmed(c, density) for c in ms]).sum(dim=0))


POLAR_RANGE = 1e-8  # singular values of concatenated singular vectors below this fraction of the largest: shared


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of x = P S Q^T on its numerical range: P_r Q_r^T over the r singular values above
    POLAR_RANGE x the largest. Where x has full column rank (concatenated singular vectors of inputs with
    independent directions) that is the polar factor P Q^T itself; where it does not (inputs that share directions:
    the same LoRA twice), the polar factor is not unique - the paper's method is undefined there - and this one, the
    partial isometry on x's range, is the choice: inputs that share every direction merge to the mean of their
    weighted updates (README: Merge methods)."""
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    r = int((s > POLAR_RANGE * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    return p[:, :r] @ qh[:r]


def tsv(name: str, parts: list[tuple[float, LowRankLayer]], settings, positions: list[int] | None = None
        ) -> LowRankLayer:
    """TSV-Merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081): each input keeps its
    k_i = min(rank(tau_i), max(1, floor(density * min(m, n)))) leading singular triplets (density None: 1/T, i.e.
    floor(min(m, n) / T)); the concatenated left and right singular vectors are each replaced by their orthogonal
    polar factor, and merged = U_perp blockdiag(Sigma_i) V_perp^T. The triplets come from the cores' SVDs (tau_i =
    U M_i V^T with U, V orthonormal) and the polar factor commutes with U, so this is the paper's method on the
    dense updates, to rounding (where the concatenated vectors have full column rank, as they do for inputs with
    independent directions)."""
    first = parts[0][1]
    m, n = first.up.shape[0], first.down.shape[1]
    density = settings.value("density")
    per = max(1, min(m, n) // len(parts) if density is None else math.floor(density * min(m, n)))

    def merge(ms: list[torch.Tensor]) -> torch.Tensor:
        lefts, sigmas, rights = [], [], []
        for c in ms:
            a, s, bh = torch.linalg.svd(c, full_matrices=False)
            k = min(_rank(s, m, n), per)
            lefts.append(a[:, :k])
            sigmas.append(s[:k])
            rights.append(bh[:k].T)
        sigma = torch.cat(sigmas)
        if sigma.numel() == 0:
            return torch.zeros_like(ms[0])
        return (_polar(torch.cat(lefts, dim=1)) * sigma) @ _polar(torch.cat(rights, dim=1)).T
    return _in_core_space(parts, merge)


def iso(name: str, parts: list[tuple[float, LowRankLayer]], settings, positions: list[int] | None = None
        ) -> LowRankLayer:
    """Iso-C (Marczak et al., ICML 2025, arXiv 2502.04959): the SVD of the sum of the updates with every singular
    value of its numerical rank replaced by their mean (the nuclear norm kept). From the SVD of the summed cores
    (the sum is U (sum_i M_i) V^T), so it is the paper's method on the dense updates, to rounding. Its spectrum is
    flat, so below its rank every choice of that many directions is a best rank-k approximation (README: Merge
    methods)."""
    first = parts[0][1]
    m, n = first.up.shape[0], first.down.shape[1]

    def merge(ms: list[torch.Tensor]) -> torch.Tensor:
        a, s, bh = torch.linalg.svd(torch.stack(ms).sum(dim=0), full_matrices=False)
        r = _rank(s, m, n)
        return (a[:, :r] * s[:r].mean()) @ bh[:r] if r else torch.zeros_like(ms[0])
    return _in_core_space(parts, merge)
