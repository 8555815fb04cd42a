"""One minibatch draw's gradient noise and its square, as a Gaussian with the same two moments.

A batch S of B of the N samples is drawn without replacement. With indicators s_i and
r_i = s_i - B/N (so sum_i r_i = 0), and c_i = grad l_i - grad L / N the centred per-sample
gradients (sum_i c_i = 0), the batch's sum of gradients is

    g_B = (B/N) grad L + delta,    delta = sum_i r_i c_i,

and an adaptive optimiser's second moment takes in g_B^2 (elementwise), whose random part is
2 (B/N) grad L * delta + delta^2 - E delta^2, with delta^2 = sum_{i,j} r_i r_j c_i c_j.

The moments of r (simple random sampling): Cov(r) = kappa (I - 1 1^T / N) with Cochran's
kappa = B (N - B) / (N (N - 1)); so Cov(delta) = kappa sum_i c_i c_i^T and
E delta^2 = kappa sum_i c_i^2.

delta^2 is quadratic in r. Its Hoeffding decomposition splits it into a part linear in r and a
pure pair part uncorrelated with every linear statistic. With d_i = c_i^2 and, for i != j,
a~_ij = c_i c_j + alpha_i + alpha_j, where alpha_i = (d_i - A) / (N - 2) and A = N mean(d) /
(2 (N - 1)) make the rows of a~ (i != j) sum to 0, the identities sum_{j != i} r_j = -r_i and
r_i^2 = (1 - 2B/N) r_i + const give

    delta^2 = (1 - 2B/N) sum_i (d_i + 2 alpha_i) r_i + Q + const,
    Q = sum_{i != j} r_i r_j a~_ij,    Cov(Q) = mu sum_{i != j} a~_ij a~_ij^T,

mu = 2 f2 - 4 f3 + 2 f4 with f2 = E r_1^2 r_2^2, f3 = E r_1^2 r_2 r_3, f4 = E r_1 r_2 r_3 r_4
(the terms of E Q Q^T sharing two, one or no index, the shared-index sums reduced by the
zero row sums). mu = 0 for B = 1 and B = N - 1, where products r_i r_j are linear in r.

So the pair (delta, delta^2 - E delta^2) has the covariance of

    sqrt(kappa) sum_i z~_i (c_i, (1 - 2B/N)(d_i + 2 alpha_i))
        + (0, sqrt(mu / 2) sum_{i != j} M_ij a~_ij),

with z ~ N(0, I_N), z~ = z - mean(z) (covariance I - 1 1^T / N), and M = (Z + Z^T) / sqrt(2)
for Z ~ N(0, I_{N x N}): Var M_ij = 1 and M_ij = M_ji, so the pairs {i, j} are independent.
The work is O(N^2 p) per draw, the memory O(N^2 + N p): no p x p matrix.
`tests/test_sde_adaptive.py` checks the covariance against all C(N, B) batches, listed.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp


def cochran(n: int, b: int) -> float:
    """kappa = B (N - B) / (N (N - 1)): Cov(r) = kappa (I - 1 1^T / N) (0 for N = 1)."""
    return b * (n - b) / (n * (n - 1)) if n > 1 else 0.0


def _moment(n: int, b: int, powers: tuple[int, ...]) -> float:
    """E prod_j r_j^{a_j} over distinct samples j: with s^k = s, r^a = (-p)^a +
    s ((1 - p)^a - (-p)^a), and E prod_{j in T} s_j = B!/(B-|T|)! (N-|T|)!/N!."""
    p = b / n
    u = [(-p) ** a for a in powers]
    v = [(1 - p) ** a - (-p) ** a for a in powers]
    total = 0.0
    for chosen in itertools.product((False, True), repeat=len(powers)):
        k = sum(chosen)
        inclusion = math.prod((b - j) / (n - j) for j in range(k))
        terms = (vj if c else uj for c, uj, vj in zip(chosen, u, v, strict=True))
        total += inclusion * math.prod(terms)
    return total


def pair_factor(n: int, b: int) -> float:
    """mu = 2 f2 - 4 f3 + 2 f4, the variance factor of the pure pair part Q (0 if N < 4,
    where no pair part with zero row sums exists, and for B = 1, N - 1 or N)."""
    if n < 4 or b in (1, n - 1, n):
        return 0.0
    mu = 2 * _moment(n, b, (2, 2)) - 4 * _moment(n, b, (2, 1, 1)) + 2 * _moment(n, b, (1,) * 4)
    return mu


def draw(c, z, Z, kappa: float, mu: float, frac: float):
    """(delta, delta^2 - E delta^2)'s Gaussian stand-in for one path (module docstring).

    Args:
        c: (N, p) centred per-sample gradients.
        z: (N,) and Z: (N, N) standard normal increments (Z unused when mu = 0).
        kappa, mu: `cochran(N, B)` and `pair_factor(N, B)`; frac: B / N.
    Returns:
        (delta, square): two p-vectors with the covariance (and cross-covariance) of
        (delta, delta^2) over the draw of a batch.
    """
    n = c.shape[0]
    d = c * c
    zc = z - jnp.mean(z)
    delta = jnp.sqrt(kappa) * (zc @ c)
    if n < 3:  # N = 2 (B = 1): delta = 2 r_1 c_1 and delta^2 = c_1^2, no noise (1 - 2B/N = 0)
        return delta, jnp.sqrt(kappa) * (1 - 2 * frac) * (zc @ d)
    A = n * jnp.mean(d, axis=0) / (2 * (n - 1))
    alpha = (d - A) / (n - 2)
    square = jnp.sqrt(kappa) * (1 - 2 * frac) * (zc @ (d + 2 * alpha))
    if mu > 0:
        M = (Z + Z.T) / jnp.sqrt(2.0)
        M = M - jnp.diag(jnp.diag(M))
        # sum_{i != j} M_ij (c_i c_j + alpha_i + alpha_j) = sum_i c_i (M c)_i + 2 (M 1) . alpha
        pairs = jnp.sum(c * (M @ c), axis=0) + 2 * (jnp.sum(M, axis=1) @ alpha)
        square = square + jnp.sqrt(mu / 2) * pairs
    return delta, square
