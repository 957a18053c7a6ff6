"""Forward process and parameterizations: conversions among eps, x0, v, the flow velocity and the score.

All functions take the noisy x_t and (alpha, sigma) broadcastable to it, with
x_t = alpha * x0 + sigma * eps, v = alpha * eps - sigma * x0 (Salimans & Ho 2022, sec. 4) and
the flow velocity u = eps - x0, which is dx_t/dt on the rectified-flow path x_t = (1 - t) x0 + t eps
(Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024, eq. 3 with their "v"), what SD3 and Flux predict.
`Denoiser` wraps a network so that samplers see one model function x_t, t -> x0-hat.
"""
from __future__ import annotations

import torch
from torch import nn

PREDICTIONS = ("eps", "x0", "v", "flow")


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample (B,) tensor to (B, 1, ..., 1) with ndim dims; 0-dim stays as is."""
    return a if a.ndim == 0 else a.reshape(*a.shape, *([1] * (ndim - a.ndim)))


def q_sample(x0, eps, alpha, sigma):
    """Forward process x_t = alpha * x0 + sigma * eps (Ho et al. 2020, eq. 4)."""
    return alpha * x0 + sigma * eps


def eps_to_x0(x, eps, alpha, sigma):
    return (x - sigma * eps) / alpha


def x0_to_eps(x, x0, alpha, sigma):
    return (x - alpha * x0) / sigma


def v_to_x0(x, v, alpha, sigma):
    # From v = alpha*eps - sigma*x0 and eps = (x - alpha*x0)/sigma; VP (alpha^2+sigma^2=1): alpha*x - sigma*v.
    return (alpha * x - sigma * v) / (alpha ** 2 + sigma ** 2)


def x0_to_v(x, x0, alpha, sigma):
    return alpha * x0_to_eps(x, x0, alpha, sigma) - sigma * x0


def flow_to_x0(x, u, alpha, sigma):
    # From x = alpha*x0 + sigma*eps and eps = u + x0: x = (alpha + sigma) x0 + sigma u; on the
    # rectified-flow path (alpha + sigma = 1) x0 = x - t u.
    return (x - sigma * u) / (alpha + sigma)


def x0_to_flow(x, x0, alpha, sigma):
    return x0_to_eps(x, x0, alpha, sigma) - x0


def ddim_step(x, x0, alpha, sigma, alpha_next, sigma_next):
    """Deterministic DDIM t -> s (Song et al. 2021, eq. 12): alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t."""
    return q_sample(x0, x0_to_eps(x, x0, alpha, sigma), alpha_next, sigma_next)


def score_from_x0(x, x0, alpha, sigma):
    """grad log p_t(x) = (alpha * E[x0|x] - x) / sigma^2 (Tweedie's formula)."""
    return (alpha * x0 - x) / sigma ** 2


def to_x0(prediction: str, out, x, alpha, sigma):
    """x0-hat from a network output in `prediction` space ("eps", "x0", "v" or "flow")."""
    if prediction == "eps":
        return eps_to_x0(x, out, alpha, sigma)
    if prediction == "v":
        return v_to_x0(x, out, alpha, sigma)
    if prediction == "flow":
        return flow_to_x0(x, out, alpha, sigma)
    if prediction == "x0":
        return out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def from_x0(prediction: str, x0, x, alpha, sigma):
    """The `prediction`-space quantity implied by x0-hat at x_t (inverse of `to_x0`)."""
    if prediction == "eps":
        return x0_to_eps(x, x0, alpha, sigma)
    if prediction == "v":
        return x0_to_v(x, x0, alpha, sigma)
    if prediction == "flow":
        return x0_to_flow(x, x0, alpha, sigma)
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def training_target(prediction: str, x0, eps, alpha, sigma):
    """What a network predicting `prediction` is regressed onto."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def check_prediction(prediction: str, schedule) -> None:
    """ValueError unless `prediction` is known and defines x0 everywhere on `schedule`'s times."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if prediction == "eps" and getattr(schedule, "zero_terminal_snr", False):
        # x0 = (x - sigma eps) / alpha has alpha = 0 at the last step (Lin et al. 2024, sec. 3.2)
        raise ValueError("a zero-terminal-SNR schedule needs prediction 'v', 'x0' or 'flow': eps gives no x0 "
                         "at SNR 0")


class Denoiser(nn.Module):
    """Model function (x_t, t, **extra_args) -> x0-hat around a net predicting eps / x0 / v / flow.

    Like EDM's Precond it owns the schedule arithmetic; the net only sees x_t and t * time_scale
    (integer timesteps for discrete schedules; e.g. 1000 * t for continuous t in [0, 1]).
    """

    def __init__(self, net: nn.Module, schedule, prediction: str = "eps", time_scale: float = 1.0):
        super().__init__()
        check_prediction(prediction, schedule)
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.time_scale = time_scale   # the net sees t * time_scale (e.g. 1000 for t in [0, 1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extra_args) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t                       # (B,)
        out = self.net(x, t * self.time_scale if self.time_scale != 1.0 else t, **extra_args)
        # Convert in at least float32: bf16 x0 = (x - sigma*eps)/alpha loses the signal at high noise.
        dtype = torch.promote_types(x.dtype, torch.float32)
        alpha, sigma = (append_dims(c.to(dtype), x.ndim) for c in self.schedule.alpha_sigma(t))
        return to_x0(self.prediction, out.to(dtype), x.to(dtype), alpha, sigma).to(x.dtype)
