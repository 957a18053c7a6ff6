"""A Gaussian mixture with its exact denoiser E[x0 | x_t]: ground truth for samplers.

For x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps, component k gives
x_t | k ~ N(alpha mu_k, v_k I) with v_k = alpha^2 s_k^2 + sigma^2, and
E[x0 | x_t, k] = mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k); E[x0 | x_t] averages these
with the posterior responsibilities r_k(x_t) proportional to w_k N(x_t; alpha mu_k, v_k I).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .param import append_dims


@dataclass
class GaussianMixture:
    weights: torch.Tensor   # (K,) summing to 1
    means: torch.Tensor     # (K, D)
    stds: torch.Tensor      # (K,) isotropic standard deviations

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """n draws (n, D) in float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps

    def denoise(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t = x] for x (B, D) and alpha, sigma scalars or (B,)."""
        dtype, x = x.dtype, x.to(torch.float64)
        alpha, sigma = (append_dims(torch.as_tensor(c, dtype=torch.float64), 2) for c in (alpha, sigma))
        s2 = self.stds ** 2                                                      # (K,)
        var = alpha ** 2 * s2 + sigma ** 2                                       # (B|1, K)
        # ||x - alpha mu_k||^2 expanded, so that nothing of size B*K*D is materialised.
        dist2 = (x.pow(2).sum(1, keepdim=True) - 2 * alpha * (x @ self.means.T)
                 + alpha ** 2 * self.means.pow(2).sum(1))                        # (B, K)
        log_r = torch.log(self.weights) - 0.5 * (dist2 / var + x.shape[1] * torch.log(var))
        r = torch.softmax(log_r, dim=1)                                          # (B, K)
        gain = alpha * s2 / var                                                  # (B|1, K)
        # sum_k r_k (mu_k + gain_k (x - alpha mu_k)) = (r (1 - alpha gain)) @ mu + (r . gain) x
        out = (r * (1 - alpha * gain)) @ self.means + (r * gain).sum(1, keepdim=True) * x
        return out.to(dtype)

    def model(self, schedule):
        """Model function (x, t) -> E[x0 | x_t] for samplers."""
        def exact(x, t):
            t = torch.as_tensor(t)
            if t.ndim == 1 and bool((t == t[0]).all()):
                t = t[0]                      # one noise level: scalar coefficients, cheaper
            alpha, sigma = schedule.alpha_sigma(t)
            return self.denoise(x, alpha, sigma)
        return exact

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the nearest component mean."""
        return torch.cdist(x.to(torch.float64), self.means).argmin(dim=1)

    def errors(self, x: torch.Tensor) -> tuple[float, float]:
        """(max |weight error|, max ||mean error||) of samples x assigned to their nearest mean."""
        k = self.assign(x)
        x = x.to(torch.float64)
        w_err, m_err = 0.0, 0.0
        for j in range(len(self.weights)):
            members = x[k == j]
            w_err = max(w_err, abs(len(members) / len(x) - float(self.weights[j])))
            if len(members) == 0:
                return w_err, float("inf")
            m_err = max(m_err, float((members.mean(0) - self.means[j]).norm()))
        return w_err, m_err


def default_mixture() -> GaussianMixture:
    """Three separated 2-D components with unequal weights and small variances."""
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], dtype=torch.float64),
        stds=torch.tensor([0.15, 0.2, 0.1], dtype=torch.float64),
    )
