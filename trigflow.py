"""TrigFlow and continuous-time consistency models (sCM, sCT, sCD): the method, nothing else.

Lu & Song, "Simplifying, Stabilizing & Scaling Continuous-Time Consistency Models", ICLR 2025 (arXiv 2410.11081).
Equation numbers are that paper's unless another paper is named. This file imports torch only: copy it alone
(with onepass.py for a network of stock layers). The discrete-time baselines (dsCD, CD, CT, iCT) are in baselines.py.

Notation (sCM §2, App. B):
  sigma_d    standard deviation of the data; 0.5 in every experiment of the paper
  x_t        = cos(t) x_0 + sin(t) z,  z ~ N(0, sigma_d^2 I),  t in [0, pi/2]
  F(u, t)    the network, fed u = x_t / sigma_d (unit variance) and the time t; c_noise(t) = t lives inside F
  dxdt       dx_t/dt = sigma_d F(x_t / sigma_d, t) along the PF-ODE (Eq. 3)
  f(x_t, t)  = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t), the consistency function (Eq. 5)
  g          the training tangent, cos(t) df/dt with warmup and normalization (Alg. 1)
A "network" here is any callable F(u, t) -> tensor shaped like u, where t has shape [B]. Close over class labels
and the CFG scale: F = lambda u, t: net(u, t, labels, s). Per-sample times are tensors [B] throughout.
"""
import contextlib
import math

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SIGMA_D = 0.5                                   # sCM §3: data std of pixels in [-1, 1] and of normalized latents
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0              # EDM's noise range (Karras et al. 2022), used by the samplers
T_MIN = math.atan(SIGMA_MIN / SIGMA_D)          # 0.0040
T_MAX = math.atan(SIGMA_MAX / SIGMA_D)          # 1.5645464: the 1-step start time (App. G.2, Tables 4-5)
T_MID = 1.1                                     # the 2-step intermediate time, the same for every model (sCM §5.2)


def _wide(x):
    """x in fp32, or wider if it already is (the tests run in fp64): t, the trig factors, tangents and the loss
    stay in full precision while the network body may run in bf16/fp16 (§5.1, EDM2's convention)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bc(a, x):
    """Shape a per-sample tensor [B] (or a number) to broadcast against x [B, ...]."""
    if not torch.is_tensor(a):
        return a
    return a.reshape(-1, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------------------------------------------------
# TrigFlow (§3, App. B) and its relation to EDM (App. B.2).


def forward_process(x0, t, z):
    """x_t = cos(t) x0 + sin(t) z and the velocity target v_t = dx_t/dt = cos(t) z - sin(t) x0 (§3)."""
    cos, sin = _bc(t.cos(), x0), _bc(t.sin(), x0)
    return cos * x0 + sin * z, cos * z - sin * x0


def velocity(F, x_t, t, sigma_d=SIGMA_D):
    """PF-ODE velocity dx_t/dt = sigma_d F(x_t / sigma_d, t) (Eq. 3)."""
    return sigma_d * F(x_t / sigma_d, t).to(x_t.dtype)


def consistency_fn(F, x_t, t, sigma_d=SIGMA_D):
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t) (Eq. 5); f(x, 0) = x exactly. The same formula is
    the diffusion model's denoiser D(x_t, t) (Eq. 23): one DDIM step from t to 0. t: a tensor [B], or one number for
    the batch, as the samplers pass it: then cos t and sin t are taken in double precision and F sees t in x_t's
    precision (near t_max = 1.5645 an fp32 t is off by up to 6e-8, which moves cos t by 1e-5 of itself)."""
    if not torch.is_tensor(t):
        cos, sin, t = math.cos(t), math.sin(t), torch.full((x_t.shape[0],), t, device=x_t.device, dtype=_wide(x_t).dtype)
        return cos * x_t - sin * velocity(F, x_t, t, sigma_d)
    return _bc(t.cos(), x_t) * x_t - _bc(t.sin(), x_t) * velocity(F, x_t, t, sigma_d)


def sigma_from_t(t, sigma_d=SIGMA_D):
    """EDM noise level of TrigFlow time t: sigma = sigma_d tan(t) (App. B.2)."""
    return sigma_d * torch.as_tensor(t).tan()


def t_from_sigma(sigma, sigma_d=SIGMA_D):
    """TrigFlow time of EDM noise level sigma: t = arctan(sigma / sigma_d) (App. B.2)."""
    return torch.atan(torch.as_tensor(sigma) / sigma_d)


def x_t_from_edm(x_sigma, t):
    """EDM state x_sigma = x0 + sigma eps  ->  TrigFlow state x_t = cos(t) x_sigma (App. B.2)."""
    return _bc(torch.as_tensor(t).cos(), x_sigma) * x_sigma


def x_edm_from_t(x_t, t):
    """TrigFlow state x_t  ->  EDM state x_sigma = x_t / cos(t) (App. B.2)."""
    return x_t / _bc(torch.as_tensor(t).cos(), x_t)


def F_from_denoiser(D, sigma_d=SIGMA_D):
    """Turn any EDM denoiser D(x_sigma, sigma) -> x0 estimate into a TrigFlow network F(u, t), so that an existing
    diffusion model can serve as an sCD teacher. Matching Eq. 23, D = cos(t) x_t - sin(t) sigma_d F, gives
    F = (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) / (sigma_d sin t). Valid for t in (0, pi/2)."""
    def F(u, t):
        x_t = u * sigma_d
        D_val = D(x_edm_from_t(x_t, t), sigma_from_t(t, sigma_d))
        return (_bc(t.cos(), x_t) * x_t - D_val) / (sigma_d * _bc(t.sin(), x_t))
    return F


def F_from_edm_network(F_edm, sigma_d=SIGMA_D, c_noise=lambda sigma: sigma.log() / 4):
    """TrigFlow F from the raw network inside EDM/EDM2 preconditioning, D = c_skip x + c_out F_edm(c_in x, c_noise)
    with sigma_data = sigma_d. Then c_in x_sigma = x_t / sigma_d and F = -F_edm(x_t / sigma_d, c_noise(sigma_d tan t))
    (App. B.2). EDM's c_noise is ln(sigma)/4; pass another for other preconditionings. Close over labels."""
    return lambda u, t: -F_edm(u, c_noise(sigma_from_t(t, sigma_d)))


# ---------------------------------------------------------------------------------------------------------------
# Training: time proposal, adaptive weighting, diffusion loss (the teacher), sCM loss (the student).


def sample_t(n, P_mean, P_std, sigma_d=SIGMA_D, device=None, generator=None):
    """Log-normal proposal: log(sigma_d tan t) ~ N(P_mean, P_std^2) (App. A, Alg. 1). The paper gives no clamp; we
    clamp to [T_MIN, T_MAX], the samplers' range, so that t never reaches 0 or pi/2 exactly."""
    tau = torch.randn(n, device=device, generator=generator) * P_std + P_mean
    return torch.atan(tau.exp() / sigma_d).clamp(T_MIN, T_MAX)


class AdaptiveWeight(nn.Module):
    """w_phi(t), the learned adaptive weighting of Eq. 8 (App. D), trained with the same optimizer as theta.
    Minimizing e^w E[||.||^2/D] - w gives e^{w*(t)} = 1 / E[||.||^2 / D | t], which evens out the loss over t.
    The paper says only that it follows EDM2 (UNCONFIRMED); we use EDM2's uncertainty head: 128 magnitude-preserving
    Fourier features of EDM2's input c = ln(sigma)/4 = ln(sigma_d tan t)/4 (EDM2 Eq. 75), then a linear layer to a
    scalar. Zero-initialized, so training starts with unit weight. The Fourier buffers come from a fixed seed so
    that every rank and every run builds the same module."""

    def __init__(self, channels=128, sigma_d=SIGMA_D):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer('freqs', 2 * math.pi * torch.randn(channels, generator=gen))
        self.register_buffer('phases', 2 * math.pi * torch.rand(channels, generator=gen))
        self.linear = nn.Linear(channels, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.sigma_d = sigma_d

    def forward(self, t):
        with torch.autocast(t.device.type, enabled=False):                     # a scalar per sample, in fp32
            c = torch.log(self.sigma_d * t.float().clamp(T_MIN, T_MAX).tan()) / 4
            features = torch.cos(c[:, None] * self.freqs + self.phases) * math.sqrt(2)
            return self.linear(features).squeeze(1)                            # [B]


def diffusion_loss(F, x0, t, z, w=None, sigma_d=SIGMA_D):
    """TrigFlow diffusion loss (Eq. 4/25) for the teacher: mean over elements of (F(x_t/sigma_d, t) - v_t/sigma_d)^2,
    i.e. ||sigma_d F - v_t||^2 / (sigma_d^2 D), which is EDM's weighting of the x0 error: D - x0 = -sin(t) (sigma_d F - v_t). With w = w_phi(t)
    [B], EDM2's uncertainty weighting in Eq. 8's form: e^w * mse - w. Returns (loss averaged over the batch, mse [B])."""
    x_t, v_t = forward_process(x0, t, z)
    mse = (_wide(F(x_t / sigma_d, t)) - _wide(v_t) / sigma_d).square().flatten(1).mean(1)
    loss = mse if w is None else w.exp() * mse - w
    return loss.mean(), mse.detach()


def _same_rng(device):
    """A block after which the RNG is back where it started, so that the next forward draws the same dropout mask."""
    return torch.random.fork_rng(devices=[device] if device.type == 'cuda' else [], device_type=device.type)


def _jvp(F, x_t, t, dxdt, sigma_d, jvp=None):
    """F(x_t/sigma_d, t) and cos(t) sin(t) dF/dt along (dx_t/dt, 1), from one JVP with the cos*sin factor folded into
    the tangent inputs (the JVP rearrangement of §5.1): no intermediate tangent is scaled by the large 1/sin or 1/cos
    factors that overflow fp16 near t = 0 or pi/2. Records a graph for F's primal if grad is on."""
    cos, sin = _bc(t.cos(), x_t), _bc(t.sin(), x_t)
    if jvp is None:
        jvp = lambda u, t, tangents: torch.func.jvp(F, (u, t), tangents)
    with sdpa_kernel([SDPBackend.MATH]):   # fused SDPA has no forward AD; model.attention routes around this itself
        F_val, cs_dFdt = jvp(x_t / sigma_d, t, (cos * sin * dxdt / sigma_d, (cos * sin).flatten()))
    return _wide(F_val), _wide(cs_dFdt)


class JVP(nn.Module):
    """net(u, t, *args), or with tangents=(u_dot, t_dot) its torch.func.jvp: (F, dF). Under DDP wrap this, not net:
    DDP's own forward logic then runs outside torch.func's transform, where it fails (pytorch #102197), and the
    one-pass step's backward all-reduces the gradients as usual. scm_loss's jvp= is then
    lambda u, t, tangents: ddp(u, t, labels, tangents=tangents). Calling ddp.module instead runs the same step with
    no gradient all-reduce, silently: always call the DDP module. mode: a context manager class entered around the
    JVP; onepass.OnePass gives a network of stock layers the one-pass step (model.py's networks need none)."""

    def __init__(self, net, mode=None):
        super().__init__()
        if isinstance(net, nn.parallel.DistributedDataParallel):
            raise TypeError('trigflow.JVP(ddp): wrap the other way round, DDP(trigflow.JVP(net)); and call the DDP '
                            'module, not ddp.module, whose gradients no rank would all-reduce')
        self.net, self.mode = net, mode

    def forward(self, u, t, *args, tangents=None):
        if tangents is None:
            return self.net(u, t, *args)
        with self.mode() if self.mode else contextlib.nullcontext():
            return torch.func.jvp(lambda u, t: self.net(u, t, *args), (u, t), tangents)


def _tangent(F_minus, cs_dFdt, x_t, t, dxdt, r, sigma_d):
    """g = -cos^2(t) (sigma_d F_minus - dxdt) - r cos(t) sin(t) (x_t + sigma_d dF_minus/dt)    (Eq. 6, Alg. 1)"""
    cos, sin = _bc(t.cos(), x_t), _bc(t.sin(), x_t)
    return -cos ** 2 * (sigma_d * F_minus - dxdt) - r * (cos * sin * x_t + sigma_d * cs_dFdt)


@torch.no_grad()
def scm_tangent(F, x_t, t, dxdt, r=1.0, sigma_d=SIGMA_D, jvp=None):
    """F_minus = F(x_t/sigma_d, t) and the tangent g = cos(t) df_minus/dt of Alg. 1, before normalization (Eq. 6):
    the tangent alone, without gradient. r is the tangent warmup factor min(1, step / 10k) (§4.2); jvp: scm_loss's."""
    t, x_t, dxdt = _wide(t), _wide(x_t), _wide(dxdt)
    F_minus, cs_dFdt = _jvp(F, x_t, t, dxdt, sigma_d, jvp)
    return F_minus, _tangent(F_minus, cs_dFdt, x_t, t, dxdt, r, sigma_d)


def normalize_tangent(g, c=0.1, kind='rms'):
    """Tangent normalization g / (||g|| + c) with c = 0.1 (§4.2, all experiments).

    The paper does not say which norm ||g|| is. We default to the RMS norm ||g|| / sqrt(D), as NVlabs/FastGen
    (`g_norm_spatial_invariance`) and xandergos/sCM-mnist do: c = 0.1 is then compared with the per-element size of g,
    as is the paper's alternative (clipping g to [-1, 1] element-wise), and its effect does not change with
    resolution. kind='l2' is the plain per-sample norm (Sana-Sprint's choice); with D >= 784 it is >> 0.1 for any
    tangent that matters, and c does nothing. Either way ||g_normalized|| < 1 in its own norm."""
    norm = g.flatten(1).norm(dim=1)
    if kind == 'rms':
        norm = norm / math.sqrt(g[0].numel())
    elif kind != 'l2':
        raise ValueError(f"tangent norm kind must be 'rms' or 'l2', not {kind!r}")
    return g / (_bc(norm, g) + c)


def tangent_warmup(step, H=10_000):
    """r = min(1, step / H), H = 10k iterations (§4.2, Tables 4-5): ramps the second tangent term in."""
    return min(1.0, step / H) if H > 0 else 1.0


def scm_loss(F, x_t, t, dxdt, *, w=None, r=1.0, c=0.1, tangent_norm='rms', tangent=None, two_pass=False, jvp=None,
             sigma_d=SIGMA_D):
    """The sCM loss of a batch (Eq. 8, Alg. 1: tangent, normalization, loss), averaged over the batch:

        (e^{w_phi(t)} / D) ||F_theta(x_t/sigma_d, t) - F_theta-(x_t/sigma_d, t) - g||^2 - w_phi(t)

    Its value is the weighted norm of g; its gradient pulls F_theta toward F_theta- + g, which equals the
    continuous-time CM gradient with the prior weighting 1/(sigma_d tan t) (§4.2, Eq. 2; test_scm_gradient_is_limit).

    F        the network with gradient (under DDP: the wrapped model, so that backward all-reduces the gradients)
    jvp      jvp(u, t, tangents) -> (F(u, t), dF) of the same network; default torch.func.jvp of F. Under DDP, the
             wrapped JVP(net) below (DDP cannot run inside torch.func.jvp)
    dxdt     dx_t/dt: cos(t) z - sin(t) x0 for sCT; sigma_d F_teacher(x_t/sigma_d, t), from the teacher's EMA, for sCD
    w        w_phi(t) [B] from AdaptiveWeight (trained jointly), or None for unit weight
    r        tangent warmup factor; c, tangent_norm: tangent normalization (c=None switches it off)
    tangent  None: sCM's; tangent(F, x_t, t, dxdt, r, F_theta) -> g: another (baselines.dscd_loss, App. E), given
             F_theta from one forward, whose RNG state it starts from (the same dropout mask)

    One pass. Alg. 1 takes the tangent at theta- = stopgrad(theta) (lines 5-6) and F_theta (line 7) at the same
    weights and input, so one grad-enabled JVP gives both:
        F_theta, dF/dt = jvp(F)(x_t/sigma_d, t);  g = g(F_theta.detach(), dF/dt);  ||F_theta - F_theta.detach() - g||^2
    One forward is also one dropout mask. model.py's networks keep autograd from recording the tangent, so the step
    saves what a diffusion step saves; a network of stock PyTorch layers gets the same loss and gradients while
    autograd records its tangent too (bench.py: 3x the peak memory). two_pass=True is for such a network when memory
    binds: the tangent from a no-grad JVP, then a second forward with gradient (the same dropout mask: the RNG is
    forked around the first), at ~2x a diffusion step's time instead of ~1.7x. dsCD reuses the forward at t likewise.
    Returns (loss, terms): detached batch means for logging and the non-finite check --
    loss; mse, the weighted term's ||.||^2 / D; tangent_rms, the RMS of g before normalization; dxdt_rms; w."""
    if tangent is not None:                                                       # another tangent (dsCD, App. E)
        with _same_rng(x_t.device):                                               # it may reuse F_theta's dropout mask
            F_theta = _wide(F(x_t / sigma_d, t))
        g = tangent(F, x_t, t, dxdt, r, F_theta.detach())
    elif two_pass:
        with _same_rng(x_t.device):
            _, g = scm_tangent(F, x_t, t, dxdt, r=r, sigma_d=sigma_d, jvp=jvp)
        F_theta = _wide(F(x_t / sigma_d, t))
    else:                                                                         # Alg. 1 lines 5-7 in one forward
        t_, x_t_, dxdt_ = _wide(t), _wide(x_t), _wide(dxdt)
        F_theta, cs_dFdt = _jvp(F, x_t_, t_, dxdt_, sigma_d, jvp)
        g = _tangent(F_theta.detach(), cs_dFdt.detach(), x_t_, t_, dxdt_, r, sigma_d)
    tangent_rms = g.square().flatten(1).mean(1).sqrt()
    if c is not None:
        g = normalize_tangent(g, c, tangent_norm)                                 # g <- g / (||g|| + c)
    # F_theta- = stopgrad(F_theta): the same forward with the gradient stopped, so F_theta - F_theta- is exactly 0.
    mse = (F_theta - F_theta.detach() - g).square().flatten(1).mean(1)
    loss = mse if w is None else w.exp() * mse - w
    zero = torch.zeros((), device=x_t.device)
    terms = dict(loss=loss.detach().mean(), mse=mse.detach().mean(), tangent_rms=tangent_rms.mean(),
                 dxdt_rms=_wide(dxdt).square().mean().sqrt(), w=zero if w is None else w.detach().mean())
    return loss.mean(), terms


# ---------------------------------------------------------------------------------------------------------------
# sCD + adaptive VSD (§5.2, App. C): a "fake score" diffusion model F_phi, trained on the student's own 1-step
# samples, adds a distribution-matching gradient to sCD's. The paper gives the loss; the steps between are
# reconstructed here (the spec's §4), and the choices it leaves open are CHOICES.md's.


def one_step(F, z, t_max=T_MAX, sigma_d=SIGMA_D):
    """The CM as a generator, g_theta(z') = f_theta(z', t_max) for z' ~ N(0, sigma_d^2 I): the 1-step sample (App. C
    writes pi/2, Table 5 t_max = arctan(80 / sigma_d); we use t_max, the 1-step sampler's start, 0.006 from pi/2)."""
    return consistency_fn(F, z, float(t_max), sigma_d)


def avsd_loss(x0, F_teacher, F_fake, t, z, *, w=None, sigma_d=SIGMA_D):
    """Adaptive VSD for the generator (App. C), averaged over the batch:

        (e^{w_psi(t)} / D) ||g_theta(z') - g_theta-(z') + F_pretrain(x_t/sigma_d, t) - F_phi(x_t/sigma_d, t)||^2 - w_psi(t)

    x0 = g_theta(z') with gradient (one_step), x_t = cos t x0 + sin t z from the detached sample; t from the proposal
    log(sigma_d tan t) ~ N(0.4, 2.0^2) (Table 5); F_teacher, F_fake without gradient. The value is the weighted norm
    of the difference; the gradient is 2 e^w / D (F_pretrain - F_phi)^T dg/dtheta. Since the score of x_t is
    -x_t / sigma_d^2 - cos t F / (sigma_d sin t) (App. B), F_phi - F_pretrain points along score_pretrain - score_phi,
    the descent direction of KL(p_theta || p_data) (VSD; the test derives it on Gaussians). The hand-made VSD weight
    cos^2 t / (sigma_d sin t) is replaced by the proposal and w_psi (App. C). Returns (loss, terms) as scm_loss."""
    x_t, _ = forward_process(x0.detach(), t, z)
    with torch.no_grad():
        delta = _wide(F_teacher(x_t / sigma_d, t)) - _wide(F_fake(x_t / sigma_d, t))
    x0 = _wide(x0)
    mse = (x0 - x0.detach() + delta).square().flatten(1).mean(1)
    loss = mse if w is None else w.exp() * mse - w
    zero = torch.zeros((), device=x0.device)
    return loss.mean(), dict(vsd=loss.detach().mean(), vsd_mse=mse.detach().mean(),
                             vsd_w=zero if w is None else w.detach().mean())


# ---------------------------------------------------------------------------------------------------------------
# Sampling.


def guided(F_cond, F_uncond, s):
    """Classifier-free guidance in F space, F_u + s (F_c - F_u) (Ho & Salimans 2022). D and dxdt are affine in F at a
    fixed (x_t, t), so this equals guidance on the denoiser. s is a number or a tensor [B]."""
    def F(u, t):
        F_u = F_uncond(u, t)
        return F_u + _bc(s, F_u) * (F_cond(u, t) - F_u)
    return F


@torch.no_grad()
def sample_consistency(F, z, ts=(T_MAX,), sigma_d=SIGMA_D, randn_like=torch.randn_like):
    """Multistep consistency sampling (CM 2023 Alg. 1 in TrigFlow time): x0 = f(z, ts[0]); then for each later
    time t: re-noise x_t = cos(t) x0 + sin(t) sigma_d eps and x0 = f(x_t, t). z ~ N(0, sigma_d^2 I) stands for
    x_{t_max}. ts=(T_MAX,) is 1 step; (T_MAX, T_MID) is the paper's 2 steps. randn_like draws eps (pass a seeded
    one for reproducible per-image noise)."""
    x0 = consistency_fn(F, z, float(ts[0]), sigma_d)             # a number: the trig factors in double precision
    for t in ts[1:]:
        x_t = math.cos(t) * x0 + math.sin(t) * sigma_d * randn_like(x0)
        x0 = consistency_fn(F, x_t, float(t), sigma_d)
    return x0


def edm_sigmas(num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0):
    """EDM's time steps (Karras et al. 2022, Eq. 5), descending from sigma_max to sigma_min, then 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_heun(F, z, num_steps=18, sigma_d=SIGMA_D, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0):
    """The teacher's ODE sampler: EDM's deterministic Heun (Karras et al. 2022, Alg. 1) on the EDM grid, run in EDM
    variables x_sigma = x_t / cos(t). This is the DPM-Solver-2S with Heun's intermediate time the paper uses
    (App. G.1; written in TrigFlow in App. B.1). 2 num_steps - 1 NFE: 18 steps = 35 NFE (CIFAR-10), 32 steps = 63
    NFE (ImageNet).
    z ~ N(0, sigma_d^2 I) stands for x_{t_max}, t_max = arctan(sigma_max / sigma_d)."""
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()

    def D(x_sigma, sigma):                       # EDM denoiser from TrigFlow F (Eq. 23 with x_t = cos t x_sigma)
        t = math.atan(sigma / sigma_d)           # t, cos t and sin t in double precision (see consistency_fn)
        return consistency_fn(F, math.cos(t) * x_sigma, t, sigma_d)

    x = z / math.cos(math.atan(sigma_max / sigma_d))
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - D(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d
        if s_next > 0:                           # 2nd-order correction, skipped on the last step to sigma = 0
            x_next = x + (s_next - s_cur) * 0.5 * (d + (x_next - D(x_next, s_next)) / s_next)
        x = x_next
    return x
