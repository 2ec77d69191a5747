"""CLUB: a contrastive log-ratio upper bound of the mutual information I(x; y) (Cheng et al., 2020).

A variational Gaussian ``q(y | x) = N(mu(x), diag(exp(logvar(x))))`` is fitted to the joint samples by maximum
likelihood (:meth:`CLUB.learning_loss`); with it,

    I_CLUB = mean_i [ log q(y_i | x_i) - mean_j log q(y_j | x_i) ]

contrasts each true pair with all pairings of ``x_i`` with the batch's ``y_j``. It is an upper bound of I(x; y) when
q approximates p(y | x) well, and is 0 in expectation when x and y are independent. OAL's MICL minimises it between
projected outlier embeddings (x) and the student's penultimate features (y).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastdd.models.init import init_parameters


class CLUB(nn.Module):
    """The variational network ``q(y | x)`` of CLUB and the estimate built on it.

    Both heads are ``Linear(x_dim, hidden // 2) -> ReLU -> Linear(hidden // 2, y_dim)``; the log-variance head ends in
    ``tanh``, so every variance lies in ``[e^-1, e]`` (the CLUB authors' choice: it keeps the likelihood bounded).

    Args:
        x_dim, y_dim: sizes of x and y.
        hidden: hidden size; each head has ``hidden // 2`` (at least 1) hidden units.
        generator: source of the initial parameters (PyTorch's default laws); None draws from the global RNG.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if min(x_dim, y_dim, hidden) < 1:
            raise ValueError(f"CLUB expects positive sizes, got x_dim={x_dim}, y_dim={y_dim}, hidden={hidden}")
        self.x_dim, self.y_dim = x_dim, y_dim
        units = max(1, hidden // 2)
        device = torch.get_default_device() if generator is None else generator.device
        with torch.device("meta"):
            self.mean_net = nn.Sequential(nn.Linear(x_dim, units), nn.ReLU(), nn.Linear(units, y_dim))
            self.logvar_net = nn.Sequential(nn.Linear(x_dim, units), nn.ReLU(), nn.Linear(units, y_dim), nn.Tanh())
        init_parameters(self.to_empty(device=device), generator)

    def mean_logvar(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(x), logvar(x))``, each ``[N, y_dim]`` for ``x`` ``[N, x_dim]``."""
        return self.mean_net(x), self.logvar_net(x)

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """``mean_i log q(y_i | x_i)``, the full Gaussian log-density (with ``-1/2 log 2 pi`` per dimension).

        Args:
            x: ``[N, x_dim]``; y: ``[N, y_dim]`` (row i of each is one joint sample).
        Returns:
            0-d.
        """
        self._check(x, y)
        mu, logvar = self.mean_logvar(x)
        per_dim = -0.5 * ((y - mu).square() * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
        return per_dim.sum(dim=1).mean()

    def learning_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """What q is trained on: ``-log_likelihood(x, y)`` (0-d)."""
        return -self.log_likelihood(x, y)

    def mi_upper_bound(self, x: Tensor, y: Tensor) -> Tensor:
        """The CLUB estimate ``mean_i [log q(y_i | x_i) - mean_j log q(y_j | x_i)]`` (0-d; j runs over all N rows,
        i included).

        Both terms use the same ``q(. | x_i)``, so its ``-1/2 logvar(x_i)`` and ``-1/2 log 2 pi`` cancel and are not
        computed; what remains, summed over dimensions d, is

            -(y_id - mu_id)^2 / (2 var_id)  +  mean_j (y_jd - mu_id)^2 / (2 var_id),

        and ``mean_j (y_jd - mu_id)^2 = (ybar_d - mu_id)^2 + s_d^2`` (batch mean ``ybar``, population variance
        ``s^2``), so no ``[N, N, y_dim]`` tensor is formed. Differentiable w.r.t. x, y and q's parameters.

        Args:
            x: ``[N, x_dim]``; y: ``[N, y_dim]``, N >= 1.
        """
        self._check(x, y)
        mu, logvar = self.mean_logvar(x)
        inv_var = torch.exp(-logvar)
        y_mean = y.mean(dim=0, keepdim=True)
        y_var = (y - y_mean).square().mean(dim=0, keepdim=True)
        positive = -(y - mu).square() * inv_var
        negative = -((y_mean - mu).square() + y_var) * inv_var
        return 0.5 * (positive - negative).sum(dim=1).mean()

    def _check(self, x: Tensor, y: Tensor) -> None:
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"CLUB expects x [N, x_dim] and y [N, y_dim] with N >= 1, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if x.shape[1] != self.x_dim or y.shape[1] != self.y_dim:
            raise ValueError(f"CLUB was built for x_dim={self.x_dim}, y_dim={self.y_dim}, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")


__all__ = ["CLUB"]
