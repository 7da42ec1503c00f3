"""What did LoRA learn? The maths of Hu et al. (2021), section 7 and appendix H, on plain matrices:

    subspace similarity between two adapters' A matrices (eq. 4; Figures 3, 4, 6, 7), with its exact random
    expectation -> Delta W against the pre-trained W (Table 7, Figure 8, the amplification factor of appendix H).

tools/analyze.py runs these on trained adapter files (`python -m tools.analyze similarity|deltaw ...`).

Conventions. A torch SVD M = P diag(s) Qh gives P (m x k, left-singular vectors as columns), s (descending)
and Qh (k x n, right-singular vectors as rows); everything below names its vectors as columns.
"""

import math

import numpy as np
import torch

from plumbing.errors import UserError

# ----------------------------------------------------------------------------------------------------------
# Section 7.2: subspace similarity between two adapters' A matrices.


def right_singular_vectors(A):
    """The right-singular unitary matrix of A (r x d), as a d x r matrix whose column k is the k-th direction
    in the d-dim input space, in order of decreasing singular value (fp64, for exact tests)."""
    return torch.linalg.svd(torch.as_tensor(A).double(), full_matrices=False).Vh.T


def subspace_similarity(A1, A2, i, j):
    """Eq. 4: phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), in [0, 1].

    U1, U2 are the right-singular unitary matrices of A1 (r1 x d) and A2 (r2 x d). phi is the share of the
    smaller of the two subspaces (top-i directions of A1, top-j of A2) that lies inside the larger one:
    1 when one contains the other, 0 when they are orthogonal.
    """
    U1, U2 = right_singular_vectors(A1), right_singular_vectors(A2)
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"need 1 <= i <= {U1.shape[1]} and 1 <= j <= {U2.shape[1]}, got i={i}, j={j}")
    return float(torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j))


def grid_from_directions(U1, U2):
    """phi for every i <= U1's columns and j <= U2's columns: entry [i-1, j-1] is
    ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j). Shared by the A-vs-A and the W-vs-Delta-W grids."""
    overlap = (U1.T @ U2) ** 2  # overlap[a, b] = (u1_a . u2_b)^2
    # ||U1[:, :i]^T U2[:, :j]||_F^2 is the sum of overlap over a < i, b < j: a cumulative sum both ways
    total = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, U1.shape[1] + 1, dtype=total.dtype)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=total.dtype)[None, :]
    return (total / torch.minimum(i, j)).numpy()


def similarity_grid(A1, A2):
    """The r1 x r2 array of phi(A1, A2, i, j) (eq. 4) for i = 1..r1 (rows) and j = 1..r2 (columns)."""
    if A1.shape[1] != A2.shape[1]:
        raise UserError(f"A matrices act on different input sizes ({A1.shape[1]} vs {A2.shape[1]})")
    return grid_from_directions(right_singular_vectors(A1), right_singular_vectors(A2))


def random_baseline(A1, A2, seed=0):
    """similarity_grid of two independent random Gaussian matrices with the shapes of A1 and A2
    (the right panels of Figures 3 and 4: what phi looks like when nothing is shared)."""
    g = torch.Generator().manual_seed(seed)
    G1 = torch.randn(tuple(A1.shape), generator=g, dtype=torch.float64)
    G2 = torch.randn(tuple(A2.shape), generator=g, dtype=torch.float64)
    return similarity_grid(G1, G2)


def expected_random_grid(r1, r2, d):
    """E[phi(i, j)] = max(i, j) / d for independent uniformly random subspaces of R^d, as an r1 x r2 array.

    Why: a Gaussian matrix looks the same after any rotation of R^d, so its top-i right-singular subspace
    is uniformly random. Take i <= j. Each of the i orthonormal columns u of U1 is then a uniformly random
    unit vector independent of U2, and the expected squared length of its projection onto a j-dim subspace
    is j / d. Summing over the i columns, E||U1^T U2||_F^2 = i j / d; divided by min(i, j) = i: j / d.
    """
    i = np.arange(1, r1 + 1)[:, None]
    j = np.arange(1, r2 + 1)[None, :]
    return np.maximum(i, j) / d


# ----------------------------------------------------------------------------------------------------------
# Section 7.3 and appendix H: Delta W against the pre-trained W.


def top_singular(M, r):
    """(U, V): the top-r left- and right-singular vectors of M as columns (out x r, in x r), fp64."""
    U, _, Vh = torch.linalg.svd(torch.as_tensor(M).double(), full_matrices=False)
    return U[:, :r], Vh[:r].T


def projection_norms(delta, W, r, seed=0):
    """Table 7 of the paper and the amplification factor of appendix H.4, for one projection.

    The paper projects W onto the r-dim subspaces of a reference matrix M and reports ||U^T W V^T||_F, where
    U holds the top-r left-singular vectors of M as columns (out x r) and the paper's V is M's top-r
    right-singular vectors as rows (r x in, numpy's `vh`), so that V^T is in x r and U^T W V^T is an r x r
    matrix. In textbook notation M = U S V^T this is ||U_r^T W V_r||_F with V_r in x r. M is one of:

        "delta":  M = Delta W                 (how much of W lies in the directions that Delta W uses)
        "w":      M = W                       (= sqrt of the sum of W's top-r squared singular values,
                                               the largest value any r-dim U, V can give)
        "random": M = a Gaussian random matrix of W's shape (drawn from seed)

    Returns {"delta", "w", "random"} (those three norms), "w_norm" = ||W||_F, "delta_norm" = ||Delta W||_F,
    and "amplification" = ||Delta W||_F / ||U^T W V^T||_F with U, V from Delta W: how many times larger the
    update is than what W already had in the same directions (about 21.5 for Wq at r = 4 in the paper).
    """
    delta, W = torch.as_tensor(delta).double(), torch.as_tensor(W).double()
    if delta.shape != W.shape:
        raise UserError(f"Delta W has shape {tuple(delta.shape)} but W has {tuple(W.shape)}")
    g = torch.Generator().manual_seed(seed)
    random = torch.randn(tuple(W.shape), generator=g, dtype=torch.float64)
    references = {"delta": delta, "w": W, "random": random}
    norms = {}
    for name, M in references.items():
        U, V = top_singular(M, r)
        norms[name] = float(torch.linalg.matrix_norm(U.T @ W @ V))
    norms["w_norm"] = float(torch.linalg.matrix_norm(W))
    norms["delta_norm"] = float(torch.linalg.matrix_norm(delta))
    norms["amplification"] = norms["delta_norm"] / norms["delta"] if norms["delta"] > 0 else math.inf
    return norms


def singular_directions(M, side):
    """All singular vectors of M on one side as columns, strongest first: "left" (output space, out x k)
    or "right" (input space, in x k), k = min(out, in)."""
    U, _, Vh = torch.linalg.svd(torch.as_tensor(M).double(), full_matrices=False)
    if side == "left":
        return U
    if side == "right":
        return Vh.T
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def w_delta_similarity(W, delta, r, side="left"):
    """Figure 8's data: phi between W's top-i and Delta W's top-j singular directions, a k x r array.

    Entry [i-1, j-1] = ||U_W[:, :i]^T U_dW[:, :j]||_F^2 / min(i, j), for i = 1..k = min(out, in) (rows) and
    j = 1..r (columns), where U_W, U_dW hold the singular vectors of W and of Delta W (left: output space,
    as the paper's Figure 8 is read here; right: input space). For i >= j it is the average, over Delta W's
    top-j directions, of the squared length of each inside the span of W's top-i directions: near i / out
    (left) or i / in (right) if Delta W ignored W, near 1 already at small i if Delta W repeated W's
    strongest directions. The paper finds it low: Delta W amplifies directions W does not emphasize.
    """
    return grid_from_directions(singular_directions(W, side), singular_directions(delta, side)[:, :r])


def random_w_similarity(W, r, side="left", seed=0):
    """w_delta_similarity with Delta W replaced by a Gaussian random matrix of W's shape (Figure 8's
    baseline): what the grid looks like when the r directions have nothing to do with W."""
    g = torch.Generator().manual_seed(seed)
    return w_delta_similarity(W, torch.randn(tuple(W.shape), generator=g, dtype=torch.float64), r, side)


def top_tenth(W):
    """How many of W's singular directions make its top 10% (the row of Figure 8's grid in the table)."""
    return max(1, round(0.1 * min(W.shape)))
