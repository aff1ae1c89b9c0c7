"""Closed-form TrigFlow quantities for Gaussian (mixture) data, the exact references of the objective tests.

Data x0 ~ sum_k pi_k N(mu_k, diag(s_k^2)) in model space, z ~ N(0, sigma_d^2 I) (DESIGN.md section 2):
    C_k(t)  = cos^2 t s_k^2 + sin^2 t sigma_d^2                        (per-dimension marginal variance)
    v_k     = -sin t mu_k + sin t cos t (sigma_d^2 - s_k^2) / C_k (x - cos t mu_k)      (PF-ODE velocity)
    v       = sum_k P(k | x_t) v_k                                      (mixture velocity)
    v + w (v_c - v)                                                     (guidance at scale w, class c = component c)
    f*(x,t) = mu + s / sqrt(C(t)) (x - cos t mu)                        (flow map to t = 0, one component)
"""

import math

import torch


class GaussianMixture:
    def __init__(self, mu, s, weights=None, sigma_d=0.5):
        self.mu = torch.atleast_2d(torch.as_tensor(mu, dtype=torch.float64))  # (K, D)
        self.s = torch.atleast_2d(torch.as_tensor(s, dtype=torch.float64))
        K = self.mu.shape[0]
        self.weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.sigma_d = sigma_d

    def labelled_sample(self, n, generator=None):
        """n samples (n, D) and the component each comes from (n,): its class in the conditional tests."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.mu[k] + self.s[k] * torch.randn(n, self.mu.shape[1], generator=generator, dtype=torch.float64), k

    def sample(self, n, generator=None):
        return self.labelled_sample(n, generator)[0]

    def _C(self, t):
        t = t[:, None, None]  # (B, 1, 1) against (K, D)
        return torch.cos(t) ** 2 * self.s ** 2 + torch.sin(t) ** 2 * self.sigma_d ** 2  # (B, K, D)

    def components(self, x, t):
        """Each component's PF-ODE velocity v_k(x, t) (B, K, D) and log pi_k N(x; cos t mu_k, C_k(t)) (B, K)."""
        C = self._C(t)
        tt = t[:, None, None]
        diff = x[:, None, :] - torch.cos(tt) * self.mu  # (B, K, D)
        v_k = -torch.sin(tt) * self.mu + torch.sin(tt) * torch.cos(tt) * (self.sigma_d ** 2 - self.s ** 2) / C * diff
        log_p = torch.log(self.weights) - 0.5 * (diff ** 2 / C + torch.log(2 * math.pi * C)).sum(-1)
        return v_k, log_p

    def velocity(self, x, t):
        """PF-ODE velocity v(x, t), x: (B, D), t: (B,)."""
        v_k, log_p = self.components(x, t)
        return (torch.softmax(log_p, dim=1)[:, :, None] * v_k).sum(1)

    def flow_map(self, x, t):
        """f*(x_t, t) in closed form; one component only."""
        assert self.mu.shape[0] == 1, "closed-form flow map only for a single Gaussian"
        C = self._C(t)[:, 0]
        return self.mu[0] + self.s[0] / C.sqrt() * (x - torch.cos(t)[:, None] * self.mu[0])


class ClosedForm(torch.nn.Module):
    """The networks' call contract (scmlab.nets) around a closed form F(x, t): w_phi(t) = 0, and the tangent of a
    fused sCM step by forward-mode AD of the closed form (exact to rounding, no graph)."""

    num_classes = 0

    def forward(self, x, t, class_labels=None, guidance=None, return_logvar=False, tangent=None):
        F = self.F(x, t)
        out = (F, torch.zeros_like(t)) if return_logvar else (F,)
        if tangent is not None:
            with torch.no_grad():
                out += (torch.func.jvp(self.F, (x, t), tangent)[1],)
        return out if len(out) > 1 else F


class TeacherNet(ClosedForm):
    """The exact diffusion model: F*(x / sigma_d, t) = v(x, t) / sigma_d."""

    def __init__(self, data: GaussianMixture):
        super().__init__()
        self.data = data

    def F(self, x, t):
        sd = self.data.sigma_d
        return (self.data.velocity(x.double() * sd, t.double()) / sd).to(x.dtype)


class ConditionalTeacherNet(torch.nn.Module):
    """The exact class-conditional diffusion model of a mixture whose class k is its component k: F*(x / sigma_d, t, k)
    = v_k(x, t) / sigma_d, and for the null label K the mixture's velocity (the unconditional model of classifier-free
    guidance), so that F_u + w (F_c - F_u) is the exactly guided teacher."""

    def __init__(self, data: GaussianMixture):
        super().__init__()
        self.data = data
        self.num_classes = data.mu.shape[0]

    def forward(self, x, t, class_labels=None, guidance=None, return_logvar=False):
        sd = self.data.sigma_d
        v_k, log_p = self.data.components(x.double() * sd, t.double())
        v = (torch.softmax(log_p, dim=1)[:, :, None] * v_k).sum(1, keepdim=True)
        if class_labels is None:
            class_labels = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        F = (torch.cat([v_k, v], dim=1)[torch.arange(x.shape[0]), class_labels] / sd).to(x.dtype)  # (B, D)
        return (F, torch.zeros_like(t)) if return_logvar else F


class ConsistencyNet(ClosedForm):
    """The exact consistency model of one Gaussian, F = (cos t x_t - f*(x_t, t)) / (sin t sigma_d), with the
    Gaussian's mean and log-std as parameters (initialised to the truth) so that loss gradients can be checked."""

    def __init__(self, data: GaussianMixture, mu_shift=0.0):
        super().__init__()
        self.sigma_d = data.sigma_d
        self.mu = torch.nn.Parameter(data.mu[0].clone() + mu_shift)
        self.log_s = torch.nn.Parameter(data.s[0].log().clone())

    def F(self, x, t):
        sd, tt = self.sigma_d, t[:, None]
        x_t = x * sd
        s = self.log_s.exp()
        C = torch.cos(tt) ** 2 * s ** 2 + torch.sin(tt) ** 2 * sd ** 2
        f = self.mu + s / C.sqrt() * (x_t - torch.cos(tt) * self.mu)
        return (torch.cos(tt) * x_t - f) / (torch.sin(tt) * sd)
