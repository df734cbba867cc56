# SHIM - replaced by branch dense
"""The SVD of a dense matrix (a full weight difference, not a low-rank pair): the exact route only (float64
torch.linalg.svd). Branch `dense` replaces this module with the certified fast route; the API is the same."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DenseDecomposition:
    """Leading singular values S of W (descending, float64; all of them when `complete`), W's shape, the energy
    past them (`tail_energy`, 0.0 when complete), the certified bound `excess` on the written rank-k factors'
    squared error over the best rank-k's (0.0 on the exact route) and whether the fast route fell back."""
    S: np.ndarray
    shape: tuple[int, int]
    tail_energy: float
    complete: bool
    excess: float
    fallback: bool
    _U: torch.Tensor
    _Vh: torch.Tensor

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k, S_k, Vh_k) float64, zero-padded past the rank (core.decompose.Decomposition.factors' contract)."""
        kk = min(k, self._U.shape[1])
        U, Vh = self._U[:, :kk], self._Vh[:kk]
        S = torch.as_tensor(self.S[:kk].copy(), dtype=torch.float64, device=U.device)
        if k > kk:
            m, n = self.shape
            U = torch.cat([U, U.new_zeros(m, k - kk)], dim=1)
            Vh = torch.cat([Vh, Vh.new_zeros(k - kk, n)])
            S = torch.cat([S, S.new_zeros(k - kk)])
        return U, S, Vh


def decompose_dense(W: torch.Tensor, need: int | None = None, device="cpu") -> DenseDecomposition:
    """W: (m, n) any float dtype. The whole spectrum, exact (`need` is ignored by this shim)."""
    W = W.to(device=device, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return DenseDecomposition(S.cpu().numpy(), tuple(W.shape), 0.0, True, 0.0, False, U, Vh)
