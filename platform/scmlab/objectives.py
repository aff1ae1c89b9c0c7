"""Training objectives: the TrigFlow diffusion loss (teachers) and the sCT / sCD consistency losses.

Each loss is a callable built from its hyperparameters. It draws t and z, evaluates the network and returns the
per-sample loss (B,) plus a dict of detached scalar statistics (0-dim tensors or floats, so that the step does not
wait on the device; the loop reads them when it logs); the loop reduces and back-propagates.

Both use the adaptive weighting of the paper (section 4.3, as EDM2's uncertainty weighting):
    L = exp(w_phi(t)) / D * ||residual||^2 - w_phi(t)
with w_phi the network's `logvar` head, or the plain mean squared residual when `adaptive_weight` is off.
"""

import math

import torch

from . import trigflow
from .jvp import JVP_MODES, network_jvp

TANGENT_NORMS = ("l2", "rms", "clip", "none")
KINDS = ("sct", "scd")


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP / torch.compile wrapper: forward-mode AD must not run through DDP."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if inner is None:
            return net
        net = inner


def _full(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: the target and residual are formed outside autocast's low precision."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _weighted(sq_residual: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
    """Per-sample loss from a (B, ...) squared residual: exp(w) / D * sum - w, or the mean without weighting."""
    per_sample = sq_residual.flatten(1).mean(dim=1)  # (B,) = ||.||^2 / D
    if logvar is None:
        return per_sample
    return torch.exp(logvar) * per_sample - logvar


def _draw(x0: torch.Tensor, sigma_d: float, P_mean: float, P_std: float, generator, t, z):
    if t is None:
        t = trigflow.sample_t(x0.shape[0], P_mean, P_std, sigma_d, generator=generator, device=x0.device,
                              dtype=x0.dtype)
    if z is None:
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sigma_d
    return t, z


class DiffusionLoss:
    """TrigFlow diffusion (teacher) loss: E || sigma_d F_theta(x_t / sigma_d, t) - v_t ||^2   (Eq. 8).

    The residual is taken in units of sigma_d (F_theta - v_t / sigma_d) so that a per-dimension loss of 1 means
    "predicts nothing", whatever sigma_d.
    """

    def __init__(self, sigma_d: float = 0.5, P_mean: float = -1.0, P_std: float = 1.4, adaptive_weight: bool = True):
        self.sigma_d, self.P_mean, self.P_std, self.adaptive_weight = sigma_d, P_mean, P_std, adaptive_weight

    def __call__(self, net, x0, class_labels=None, *, step: int = 0, generator=None, t=None, z=None):
        t, z = _draw(x0, self.sigma_d, self.P_mean, self.P_std, generator, t, z)
        x_t = trigflow.noisy(x0, z, t)
        F, logvar = net(x_t / self.sigma_d, t, class_labels, return_logvar=True)
        residual = _full(F) - _full(trigflow.velocity(x0, z, t)) / self.sigma_d
        loss = _weighted(residual.square(), _full(logvar) if self.adaptive_weight else None)
        return loss, {"loss/mse": residual.detach().square().mean(), "weight/logvar": logvar.detach().float().mean()}


class SCMLoss:
    """sCT / sCD consistency loss, Algorithm 1 of the paper.

        dx_t/dt = cos(t) z - sin(t) x0                           (sCT: unbiased estimate)
                = sigma_d F_teacher(x_t / sigma_d, t)            (sCD: the teacher's PF-ODE, with CFG at scale s)
        r       = min(1, step / H)                               (tangent warmup)
        g       = -cos^2(t) (sigma_d F_theta^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_theta^-/dt)
        g      <- g / (||g|| + c)                                (tangent normalization)
        L       = exp(w_phi(t)) / D || F_theta - F_theta^- - g ||^2 - w_phi(t)

    theta^- is a stop-gradient of the same weights. cos(t) sin(t) dF_theta^-/dt is ONE JVP of F at
    (x_t / sigma_d, t) with tangent (cos t sin t dx_t/dt / sigma_d, cos t sin t); scaling the tangent by
    cos t sin t inside the JVP keeps it finite in low precision near t = 0 and t = pi/2. ``jvp`` picks how it is
    computed (see `evaluate`): ``fused`` carries it through the training forward, ``autograd`` and ``fd`` run a
    separate JVP pass.

    sCD with guidance_max > 1 draws the teacher's guidance scale s ~ U[1, guidance_max] per sample and passes it to
    the student as its guidance input, F_theta(x_t / sigma_d, t, s) (sec. 5.2 and App. G.2: s in [1, 2] on ImageNet
    512); a `guidance` given to the call is used instead, for the teacher and the student alike.
    """

    def __init__(self, kind: str = "sct", sigma_d: float = 0.5, P_mean: float = -1.0, P_std: float = 1.4,
                 tangent_norm: str = "l2", tangent_c: float = 0.1, warmup_steps: int = 10_000,
                 adaptive_weight: bool = True, jvp: str = "fused", fd_eps: float = 1e-3,
                 teacher: torch.nn.Module | None = None, guidance_scale: float = 1.0, guidance_max: float = 1.0):
        for name, value, allowed in (("kind", kind, KINDS), ("tangent_norm", tangent_norm, TANGENT_NORMS),
                                     ("jvp", jvp, JVP_MODES)):
            if value not in allowed:
                raise ValueError(f"objective.{name}: {value!r} is not one of {', '.join(allowed)}")
        if (kind == "scd") != (teacher is not None):
            raise ValueError("objective.teacher: sCD needs a teacher network, sCT takes none")
        self.kind, self.sigma_d, self.P_mean, self.P_std = kind, sigma_d, P_mean, P_std
        self.tangent_norm, self.tangent_c, self.warmup_steps = tangent_norm, tangent_c, warmup_steps
        self.adaptive_weight, self.jvp, self.fd_eps = adaptive_weight, jvp, fd_eps
        self.teacher, self.guidance_scale, self.guidance_max = teacher, guidance_scale, guidance_max

    def warmup(self, step: int) -> float:
        """r = min(1, step / H); H = 0 switches the warmup off."""
        return 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)

    @torch.no_grad()
    def teacher_velocity(self, x_t, t, class_labels, guidance=None):
        """sCD's dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t), with classifier-free guidance when conditional:
        F = F_uncond + w (F_cond - F_uncond), w the per-sample `guidance` (B,) or else guidance_scale."""
        x = x_t / self.sigma_d
        F = self.teacher(x, t, class_labels)
        if class_labels is not None and (guidance is not None or self.guidance_scale != 1.0):
            w = self.guidance_scale if guidance is None else trigflow.expand(guidance, x)
            F_uncond = self.teacher(x, t, torch.full_like(class_labels, self.teacher.num_classes))
            F = F_uncond + w * (F - F_uncond)
        return self.sigma_d * F

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        """Tangent normalization (section 4.3): per-sample L2 or RMS norm with constant c, or clipping to [-1, 1]."""
        if self.tangent_norm == "l2":
            return g / (_norm(g, rms=False) + self.tangent_c)
        if self.tangent_norm == "rms":
            return g / (_norm(g, rms=True) + self.tangent_c)
        if self.tangent_norm == "clip":
            return g.clamp(-1.0, 1.0)
        return g

    def evaluate(self, net, x, t, dx, dt, class_labels, guidance):
        """One evaluation of the network for the step: (F_theta with its graph, w_phi(t), F_theta^-, the JVP of
        F_theta^- at (x, t) along (dx, dt)), the last two without a graph.

        fused: ONE call of the network as trained (through its DDP wrapper, so gradients synchronize), the tangent
        carried through every layer (scmlab.tangent); F_theta^- is F_theta's value, exactly, in any precision.
        autograd / fd: the JVP on the unwrapped module (scmlab.jvp.network_jvp), then the training forward under
        the same random state (same dropout masks).
        """
        if self.jvp == "fused":
            F, logvar, dF = net(x, t, class_labels, guidance, return_logvar=True, tangent=(dx, dt))
            return F, logvar, F.detach(), dF
        inner = _unwrap(net)
        F_m, dF = network_jvp(lambda x, t: inner(x, t, class_labels, guidance), (x, t), (dx, dt), mode=self.jvp,
                              eps=self.fd_eps)
        F, logvar = net(x, t, class_labels, guidance, return_logvar=True)
        return F, logvar, F_m, dF

    def _step(self, net, x0, z, t, class_labels, step: int, guidance):
        """(F_theta, w_phi(t), F_theta^-, g, stats) of Algorithm 1."""
        sd = self.sigma_d
        x_t = trigflow.noisy(x0, z, t)
        if self.kind == "sct":
            dxt_dt = trigflow.velocity(x0, z, t)
        else:
            dxt_dt = self.teacher_velocity(x_t, t, class_labels, guidance)
        cs = torch.cos(t) * torch.sin(t)  # (B,)
        F, logvar, F_m, cs_dF_dt = self.evaluate(net, x_t / sd, t, trigflow.expand(cs, x0) * dxt_dt / sd, cs,
                                                 class_labels, guidance)
        F_m, cs_dF_dt, x_t, dxt_dt, t, cs = map(_full, (F_m, cs_dF_dt, x_t, dxt_dt, t, cs))
        r = self.warmup(step)
        g = -trigflow.expand(torch.cos(t).square(), x0) * (sd * F_m - dxt_dt) \
            - r * (trigflow.expand(cs, x0) * x_t + sd * cs_dF_dt)
        raw = _norm(g, rms=True)
        g = self.normalize(g)
        stats = {"tangent/rms": raw.mean(), "tangent/rms_max": raw.max(), "tangent/warmup": r,
                 "weight/logvar": logvar.detach().float().mean()}
        return F, logvar, F_m, g, stats

    @torch.no_grad()
    def tangent(self, net, x0, z, t, class_labels, step: int, guidance=None):
        """The target direction g of Algorithm 1 and F_theta^-, both detached, as the step computes them (for
        tests and diagnostics: no graph). Returns (F_minus, g, stats)."""
        _, _, F_m, g, stats = self._step(net, x0, z, t, class_labels, step, guidance)
        return F_m, g, stats

    def __call__(self, net, x0, class_labels=None, *, step: int, generator=None, t=None, z=None, guidance=None):
        t, z = _draw(x0, self.sigma_d, self.P_mean, self.P_std, generator, t, z)
        if guidance is None and self.guidance_max > 1:  # s ~ U[1, guidance_max] (App. G.2)
            guidance = 1 + (self.guidance_max - 1) * torch.rand(x0.shape[0], generator=generator, device=x0.device,
                                                                dtype=x0.dtype)
        F, logvar, F_m, g, stats = self._step(net, x0, z, t, class_labels, step, guidance)
        residual = _full(F) - F_m - g  # F_theta - F_theta^- is zero in value: it carries the gradient
        loss = _weighted(residual.square(), _full(logvar) if self.adaptive_weight else None)
        return loss, stats


def _norm(g: torch.Tensor, rms: bool) -> torch.Tensor:
    """Per-sample L2 norm (or RMS) of g, shaped to broadcast against it."""
    flat = g.flatten(1)
    n = flat.norm(dim=1)
    if rms:
        n = n / math.sqrt(flat.shape[1])
    return trigflow.expand(n, g)
