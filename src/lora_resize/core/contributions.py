"""How much each input of a merge contributes to the layer written, from the factors only (never an m x n matrix).

For a merged layer whose inputs are tau_i = c_i * B_i @ A_i (c_i: the input's weight times its strengths and
scale; B_i (m, r_i), A_i (r_i, n), a conv's A flattened to (r_i, in*kh*kw)) and the written layer
W = U diag(S) V^T (its rank-k truncation: U (m, k), V (n, k) orthonormal, S >= 0):

- share_i = <tau_i, W>_F / ||W||_F^2 = c_i * trace((B_i^T U) diag(S) (V^T A_i^T)) / sum S^2. For the weighted sum
  truncated to any rank the shares add up to 1 (the truncation is the orthogonal projection of the sum onto
  span(U) x span(V), so sum_i <tau_i, W> = <sum_i tau_i, W> = ||W||^2).
- kept_i = ||U^T tau_i V||_F^2 / ||tau_i||_F^2 = ||(U^T B_i)(A_i V)||_F^2 / trace((B_i^T B_i)(A_i A_i^T)): the
  fraction of the input's energy inside the written layer's column and row spaces (1 when nothing of it is cut).

Every product is r_i x k or r_i x r_i."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layer import LowRankLayer


@dataclass(frozen=True)
class MergedLayer(LowRankLayer):
    """A merged layer that carries its inputs' factors, [(c_i, B_i, A_i)] in input order (c_i None: the input
    does not hold this layer), for the report (`input_contributions`). The inputs live as long as the layer: the
    engine drops both once the layer is written, so nothing is held across layers. `dataclasses.replace` (a
    strength, ops.job.with_strength) keeps them."""
    inputs: tuple = ()


def input_contributions(inputs: tuple, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
                        ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(shares, kept, energy ||tau_i||_F^2) of each input (module docstring) for the written layer
    g * U diag(S) Vh (U (m, k), S (k,),
    Vh (k, n), float64; g: the merged layer's own strength, a global scale rule's, which multiplies every input's
    contribution as written and the layer alike, so both figures are independent of it). `inputs`:
    MergedLayer.inputs. An input without the layer has share 0, kept NaN and energy 0; a zero written layer gives
    NaN shares; an input whose update is zero has kept NaN."""
    total = float((S * S).sum())
    shares, kept, energies = [], [], []
    for c, up, down in inputs:
        if c is None:
            shares.append(0.0)
            kept.append(math.nan)
            energies.append(0.0)
            continue
        B = up.to(device=U.device, dtype=torch.float64)
        A = down.to(device=U.device, dtype=torch.float64)
        P = B.T @ U  # (r_i, k)
        Q = A @ Vh.T  # (r_i, k)
        inner = c * float(((P * S) * Q).sum())
        shares.append(inner / total if total > 0 else math.nan)
        energy = float(((B.T @ B) * (A @ A.T)).sum())  # trace((B^T B)(A A^T)), both symmetric
        inside = float(((P.T @ Q) ** 2).sum())  # ||U^T B A V||_F^2 = ||P^T Q||_F^2
        kept.append(min(inside / energy, 1.0) if energy > 0 and c != 0 else math.nan)
        energies.append(c * c * energy)
    return tuple(shares), tuple(kept), tuple(energies)
