"""Tests for trigflow.py and model.py. Each formula is checked against something computed another way: finite
differences, closed-form Gaussian answers, the discrete-time limit, or the paper's tables. CPU, fp32/fp64.

Run:  python -m pytest -q test_scm.py
"""
import math
import re
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import model
import baselines as bl
import trigflow as tf

warnings.filterwarnings('ignore', category=DeprecationWarning)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
SD = tf.SIGMA_D


# ---------------------------------------------------------------------------------------------------------------
# Closed forms for Gaussian data x0 ~ N(mu, s^2 I) (per-dimension mu, s). With z ~ N(0, sd^2 I) the marginal of x_t
# is N(cos t mu, v(t)) with v = cos^2 t s^2 + sin^2 t sd^2, and E[x0 | x_t], E[z | x_t] are linear in x_t, so
#   PF-ODE velocity  u(x, t) = sin t cos t (sd^2 - s^2) / v (x - cos t mu) - sin t mu
#   ODE flow         keeps (x - cos t mu) / sqrt(v(t)) constant, so the consistency function is
#   f*(x, t)       = mu + s (x - cos t mu) / sqrt(v(t)).


def _v(t, s):
    return t.cos() ** 2 * s ** 2 + t.sin() ** 2 * SD ** 2


def _col(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def gauss_velocity(x, t, mu, s):
    t = _col(t, x)
    return t.sin() * t.cos() * (SD ** 2 - s ** 2) / _v(t, s) * (x - t.cos() * mu) - t.sin() * mu


def gauss_f(x, t, mu, s):
    t = _col(t, x)
    return mu + s * (x - t.cos() * mu) / _v(t, s).sqrt()


def gauss_transport(x, t, t_new, mu, s):
    """Exact PF-ODE solution from (x, t) to time t_new."""
    t, t_new = _col(t, x), _col(t_new, x)
    return t_new.cos() * mu + _v(t_new, s).sqrt() * (x - t.cos() * mu) / _v(t, s).sqrt()


def gauss_marginal(t, mu, s):
    """A draw of x_t for each t [B]: N(cos t mu, v(t))."""
    tc = t.reshape(-1, 1)
    return tc.cos() * mu + _v(tc, s).sqrt() * torch.randn(t.shape[0], mu.shape[0], dtype=mu.dtype)


def F_teacher(mu, s):
    """TrigFlow network of the exact diffusion model: F = velocity / sd."""
    return lambda u, t: gauss_velocity(u * SD, t, mu, s) / SD


def F_consistency(mu, s):
    """TrigFlow network of the exact consistency model: f* = cos t x - sin t sd F, solved for F."""
    def F(u, t):
        x = u * SD
        tt = _col(t, x)
        return (tt.cos() * x - gauss_f(x, t, mu, s)) / (SD * tt.sin())
    return F


def edm_gauss_denoiser(mu, s):
    """EDM's ideal denoiser for the same data, written in EDM variables: E[x0 | x0 + sigma eps]."""
    def D(x_sigma, sigma):
        sigma = _col(sigma, x_sigma)
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x_sigma - mu)
    return D


def gauss_params(D=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    mu = (torch.rand(D, generator=g, dtype=dtype) - 0.5) * 1.2
    s = 0.1 + 0.6 * torch.rand(D, generator=g, dtype=dtype)
    return mu, s


def randomize_(net, seed=0):
    """Give zero-initialized gains and layers random values so the network's output depends on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim else 1.0) + (1.0 if p.ndim == 0 else 0))
    return net


def tiny_unet(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = dict(model.UNET_PRESETS['tiny'], **kw)
    return randomize_(model.UNet(**cfg)).to(dtype)


def tiny_dit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return randomize_(model.DiT(input_size=8, in_channels=2, patch_size=2, label_dim=3,
                                **model.DIT_PRESETS['DiT-tiny'], **kw)).to(dtype)


def tiny_ddpmpp(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    net = model.DDPMpp(**dict(dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=(1, 2),
                                   num_blocks=1, attn_resolutions=(4,)), **kw))
    with torch.no_grad():   # EDM's near-zero (1e-5) layers at unit scale, so that they show in every test
        for name, p in net.named_parameters():
            if name.endswith(('conv1.weight', 'proj.weight', 'out_conv.weight')):
                p.mul_(1e5)
    return randomize_(net).to(dtype)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# TrigFlow <-> EDM


def test_boundary_condition_exact():
    """f(x, 0) = x bit for bit (Eq. 5): no epsilon offset is needed in TrigFlow."""
    net = tiny_unet()
    x = torch.randn(3, 1, 16, 16)
    f0 = tf.consistency_fn(net, x, torch.zeros(3))
    assert torch.equal(f0, x)
    assert not torch.equal(tf.consistency_fn(net, x, torch.full((3,), 0.3)), x)


def test_edm_trigflow_round_trips():
    t = torch.linspace(0.01, 1.55, 50, dtype=torch.float64)
    assert torch.allclose(tf.t_from_sigma(tf.sigma_from_t(t)), t, atol=1e-12)
    x = torch.randn(50, 3, dtype=torch.float64)
    assert torch.allclose(tf.x_edm_from_t(tf.x_t_from_edm(x, t), t), x, atol=1e-12)
    assert abs(tf.T_MAX - 1.5645464) < 1e-6 and abs(tf.T_MIN - 0.0040) < 1e-4
    # The EDM state x0 + sigma eps maps to the TrigFlow state cos t x0 + sin t (sd eps') with the same marginal.
    x0, eps = torch.randn(200000, dtype=torch.float64), torch.randn(200000, dtype=torch.float64)
    tt = torch.tensor(0.9, dtype=torch.float64)
    x_t = tf.x_t_from_edm(x0 + tf.sigma_from_t(tt) * eps, tt)
    assert abs(x_t.var().item() - (tt.cos() ** 2 + tt.sin() ** 2 * SD ** 2).item()) < 0.01


def test_converted_edm_denoiser_gives_trigflow_velocity():
    """EDM's ideal denoiser for Gaussian data, converted by F_from_denoiser, equals the TrigFlow velocity derived
    directly in TrigFlow (an independent derivation)."""
    mu, s = gauss_params()
    F = tf.F_from_denoiser(edm_gauss_denoiser(mu, s))
    x = torch.randn(64, 6, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 1.5 + 0.03
    assert rel(SD * F(x / SD, t), gauss_velocity(x, t, mu, s)) < 1e-12


def test_edm_network_conversion_matches_denoiser_conversion():
    """F_from_edm_network(-F_edm inside EDM preconditioning) == F_from_denoiser(EDM's D) for a random network."""
    torch.manual_seed(0)
    net = model.MLP(dim=5).double()
    F_edm = lambda x_in, c_noise: net(x_in, c_noise)

    def D(x_sigma, sigma):      # EDM preconditioning (Karras et al. 2022, Table 1) with sigma_data = sd
        sig = sigma.reshape(-1, 1)
        c_skip, c_out = SD ** 2 / (sig ** 2 + SD ** 2), sig * SD / (sig ** 2 + SD ** 2).sqrt()
        c_in = 1 / (sig ** 2 + SD ** 2).sqrt()
        return c_skip * x_sigma + c_out * F_edm(c_in * x_sigma, sigma.log() / 4)

    u = torch.randn(32, 5, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64) * 1.5 + 0.03
    assert rel(tf.F_from_edm_network(F_edm)(u, t), tf.F_from_denoiser(D)(u, t)) < 1e-10


def _rk4(fn, x, a, b, n):
    h = (b - a) / n
    for i in range(n):
        c = a + i * h
        k1 = fn(x, c)
        k2 = fn(x + h / 2 * k1, c + h / 2)
        k3 = fn(x + h / 2 * k2, c + h / 2)
        k4 = fn(x + h * k3, c + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def mixture_denoiser(centers, s):
    """EDM ideal denoiser for an isotropic Gaussian mixture (nonlinear in x)."""
    def D(x, sigma):
        sig2 = _col(sigma, x) ** 2
        d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1)                     # [B, K]
        gamma = torch.softmax(-d2 / (2 * (s ** 2 + sig2.reshape(-1, 1))), dim=1)
        post = centers[None] + (s ** 2 / (s ** 2 + sig2[:, None])) * (x[:, None, :] - centers[None])
        return (gamma[..., None] * post).sum(1)
    return D


def test_converted_edm_denoiser_traces_the_same_ode():
    """Solve EDM's ODE dx/dsigma = (x - D)/sigma in sigma and TrigFlow's dx/dt = sd F in t for a nonlinear (mixture)
    denoiser; the end points agree through x_t = cos(t) x_sigma."""
    centers = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.0]], dtype=torch.float64) * 0.6
    D = mixture_denoiser(centers, 0.15)
    F = tf.F_from_denoiser(D)
    x_sigma = torch.randn(16, 2, dtype=torch.float64) * 3.0
    s0, s1 = 3.0, 0.05
    edm_end = _rk4(lambda x, sg: (x - D(x, torch.full((16,), sg, dtype=x.dtype))) / sg, x_sigma, s0, s1, 400)
    t0, t1 = math.atan(s0 / SD), math.atan(s1 / SD)
    trig = _rk4(lambda x, t: SD * F(x / SD, torch.full((16,), t, dtype=x.dtype)),
                x_sigma * math.cos(t0), t0, t1, 400)
    assert rel(trig, edm_end * math.cos(t1)) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# JVP, attention


def _fd_check(net, shape, labels=None):
    torch.manual_seed(1)
    u = torch.randn(shape, dtype=torch.float64)
    t = torch.rand(shape[0], dtype=torch.float64) * 1.4 + 0.1
    du, dt = torch.randn_like(u), torch.randn_like(t)
    fn = lambda u, t: net(u, t, labels)
    _, jvp = torch.func.jvp(fn, (u, t), (du, dt))
    h = 1e-5
    fd = (fn(u + h * du, t + h * dt) - fn(u - h * du, t - h * dt)) / (2 * h)
    return rel(jvp, fd)


def test_jvp_unet_matches_finite_difference():
    net = tiny_unet(torch.float64, label_dim=4)
    err = _fd_check(net, (2, 1, 16, 16), labels=torch.tensor([1, -1]))
    assert err < 1e-3, err
    net.train()   # dropout = 0: train mode must be JVP-able too
    assert _fd_check(net, (2, 1, 16, 16)) < 1e-3


def test_jvp_dit_matches_finite_difference():
    net = tiny_dit(torch.float64)
    err = _fd_check(net, (2, 2, 8, 8), labels=torch.tensor([0, 2]))
    assert err < 1e-3, err


def test_jvp_ddpmpp_matches_finite_difference():
    net = tiny_ddpmpp(torch.float64)
    err = _fd_check(net, (2, 2, 8, 8), labels=torch.tensor([1, -1]))
    assert err < 1e-3, err


def test_affine_matches_pytorch_and_skips_the_weight_tangent():
    """model.affine (conv2d / linear with a hand-written JVP) against PyTorch's own ops: values, gradients and JVPs
    agree (gradcheck in fp64 checks both modes against finite differences, with and without a weight tangent), and
    the JVP of a conv with only an input tangent runs two convolutions, not the three of PyTorch's rule."""
    torch.manual_seed(0)
    for x, w, b in [(torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), None),
                    (torch.randn(2, 3, 5, 5), torch.randn(4, 3, 1, 1), None),
                    (torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)),
                    (torch.randn(2, 7, 5), torch.randn(4, 5), torch.randn(4))]:
        ref = (lambda x: torch.nn.functional.conv2d(x, w, b, padding=w.shape[-1] // 2)) if w.ndim == 4 else \
              (lambda x: torch.nn.functional.linear(x, w, b))
        v = torch.randn_like(x)
        y, y_t = torch.func.jvp(lambda x: model.affine(x, w, b), (x,), (v,))
        y_ref, y_t_ref = torch.func.jvp(ref, (x,), (v,))
        assert (y - y_ref).abs().max() < 1e-5 and (y_t - y_t_ref).abs().max() < 1e-5
        args = [a.double().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())]
        assert torch.autograd.gradcheck(lambda *a: model.affine(*a), args, check_forward_ad=True)
        assert torch.autograd.gradcheck(lambda x: model.affine(x, args[1].detach(), b if b is None else b.double()),
                                        (args[0],), check_forward_ad=True)
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    with torch.profiler.profile() as prof, torch.no_grad():
        torch.func.jvp(lambda x: model.affine(x, w), (x,), (torch.randn_like(x),))
    n_conv = sum(e.count for e in prof.key_averages() if e.key == 'aten::_convolution')
    assert n_conv == 2, n_conv


def test_attention_paths_agree():
    """Attention under a tangent (fused SDPA's value, App. F's tangent) == without one, in fp32, alone and inside the
    networks; its tangent is finite."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    fused = model.attention(q, k, v)
    with fwAD.dual_level():
        dual = model.attention(fwAD.make_dual(q, torch.randn_like(q)), k, v)
        primal, tangent = fwAD.unpack_dual(dual)
    assert (primal - fused).abs().max() < 1e-5
    _, tangent_func = torch.func.jvp(lambda q: model.attention(q, k, v), (q,), (torch.ones_like(q),))
    assert torch.isfinite(tangent).all() and torch.isfinite(tangent_func).all()
    for net, shape in [(tiny_unet(), (2, 1, 16, 16)), (tiny_dit(), (2, 2, 8, 8)), (tiny_ddpmpp(), (2, 2, 8, 8))]:
        u, t = torch.randn(shape), torch.rand(2)
        plain = net(u, t)
        via_jvp, _ = torch.func.jvp(lambda u: net(u, t), (u,), (torch.randn_like(u),))
        assert (plain - via_jvp).abs().max() < 1e-5


def test_scm_tangent_matches_finite_difference_of_f():
    """g = cos(t) df/dt along dx/dt, computed with the JVP rearrangement (sec. 5.1), equals cos(t) times a central
    difference of the consistency function along the same direction (r = 1, fp64, the full U-Net)."""
    net = tiny_unet(torch.float64)
    torch.manual_seed(2)
    x_t = torch.randn(3, 1, 16, 16, dtype=torch.float64) * SD
    t = torch.tensor([0.05, 0.8, 1.5], dtype=torch.float64)
    dxdt = torch.randn_like(x_t) * SD
    F_minus, g = tf.scm_tangent(net, x_t, t, dxdt, r=1.0)
    h = 1e-5
    f = lambda x, tt: tf.consistency_fn(net, x, tt)
    dfdt = (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    assert rel(g, _col(t.cos(), g) * dfdt) < 1e-6
    assert rel(F_minus, net(x_t / SD, t)) < 1e-12
    # warmup: r scales only the second term, so g(r) is affine in r and g(0) is the velocity-matching term
    _, g0 = tf.scm_tangent(net, x_t, t, dxdt, r=0.0)
    _, g_half = tf.scm_tangent(net, x_t, t, dxdt, r=0.5)
    assert rel(g_half, (g0 + g) / 2) < 1e-12
    assert rel(g0, -_col(t.cos(), g) ** 2 * (SD * F_minus - dxdt)) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# The sCM objective


def _flat_grad(net):
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def _vsd_grads(a, b, mu, s, n=20000, F_fake=None, seed=0):
    """E[d avsd_loss / d(a, b)] for the Gaussian generator g(z') = a + b z' / sd (so g ~ N(a, b^2)), data N(mu, s^2),
    the exact teacher F_teacher(mu, s) and, unless given, the exact fake score of the generator, F_teacher(a, b)."""
    torch.manual_seed(seed)
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    z1 = torch.randn(n, a.shape[0], dtype=a.dtype) * SD
    x0 = tf.one_step(lambda u, t: (u * SD * (_col(t, u).cos()) - (a + b * u)) / (SD * _col(t, u).sin()), z1)
    t = tf.sample_t(n, 0.4, 2.0).to(a.dtype)                                   # L_VSD's proposal (Table 5)
    z = torch.randn_like(x0) * SD
    loss, _ = tf.avsd_loss(x0, F_teacher(mu, s), F_fake or F_teacher(a.detach(), b.detach()), t, z)
    return torch.autograd.grad(loss, (a, b))


def test_avsd_gradient_is_zero_when_the_fake_score_is_the_teachers():
    """F_phi = F_pretrain: the student's VSD gradient is exactly zero (only the difference of the two scores moves
    it), and so is the loss' value without w."""
    mu, s = gauss_params(D=4)
    a, b = mu + 0.3, s * 1.5
    ga, gb = _vsd_grads(a, b, mu, s, n=256, F_fake=F_teacher(mu, s))
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb))


def test_avsd_gradient_follows_the_kl_on_gaussians():
    """Data N(mu, s^2), generator g(z') = a + b z'/sd ~ N(a, b^2), per dimension; teacher and fake score exact.
    Derivation: the score of x_t is -x_t / sd^2 - cos t F(x_t / sd, t) / (sd sin t) (x0_hat = cos t x_t - sin t sd F),
    so score_fake - score_data = -cos t (F_fake - F_data) / (sd sin t). The KL of the diffused distributions,
    q_t = law of cos t g + sin t z, has gradient E[(score_fake - score_data)(x_t) dx_t/dtheta] with
    dx_t/dtheta = cos t dg/dtheta, i.e. cos^2 t / (sd sin t) E[(F_data - F_fake) dg/dtheta]; avsd_loss's gradient is
    2 / D E[(F_data - F_fake) dg/dtheta] at the same t: a positive multiple of grad KL(q_t || p_t) at every t. For
    these Gaussians q_t = N(cos t a, cos^2 t b^2 + sin^2 t sd^2), p_t likewise with (mu, s), so in every dimension
    d KL_t / d a has the sign of a - mu and d KL_t / d b that of b - s, for every t: the VSD gradient, a positive
    mixture over t, has the signs of the data-space KL gradient ((a - mu) / s^2, b / s^2 - 1 / b)."""
    mu, s = gauss_params(D=4)
    a = mu + torch.tensor([0.3, -0.2, 0.15, -0.4], dtype=mu.dtype)
    b = s * torch.tensor([1.5, 0.6, 0.8, 1.3], dtype=s.dtype)
    ga, gb = _vsd_grads(a, b, mu, s)
    kl_a, kl_b = (a - mu) / s ** 2, b / s ** 2 - 1 / b
    assert torch.equal(ga.sign(), kl_a.sign()) and torch.equal(gb.sign(), kl_b.sign()), (ga, kl_a, gb, kl_b)
    assert (ga * kl_a).sum() + (gb * kl_b).sum() > 0


def test_avsd_fake_score_follows_the_guidance_scale():
    """Guided Gaussians (D = 2): cond N(mu_c, s^2), uncond N(mu_u, s^2); the guided teacher at scale s is the exact
    teacher of N(mu_s, s^2), mu_s = mu_u + s (mu_c - mu_u) (F is affine in the mean: checked). A student exact at
    every s (g(z', s) ~ N(mu_s, s^2)), with s ~ U[1, 2] per sample as in training: when F_phi sees s (the exact
    score of the student at each sample's s) the VSD gradient is zero; when it ignores s (the exact score of the
    student's samples pooled over s, a mixture) it is not -- the right student would be pushed away."""
    mu_c, mu_u = torch.tensor([0.4, -0.3], dtype=torch.float64), torch.tensor([-0.2, 0.1], dtype=torch.float64)
    s = torch.tensor([0.3, 0.2], dtype=torch.float64)
    n = 4000
    torch.manual_seed(0)
    scale = 1 + torch.rand(n, 1, dtype=torch.float64)                            # s ~ U[1, 2], as s_max = 2
    mu_s = mu_u + scale * (mu_c - mu_u)                                          # [n, D]
    u, tt = torch.randn(n, 2, dtype=torch.float64), torch.rand(n, dtype=torch.float64) * 1.4 + 0.05
    guided = tf.guided(F_teacher(mu_c, s), F_teacher(mu_u, s), scale.flatten())
    assert rel(guided(u, tt), F_teacher(mu_s, s)(u, tt)) < 1e-12                 # the guided teacher, closed form
    p, q = mu_u.clone().requires_grad_(), (mu_c - mu_u).clone().requires_grad_()  # the student: g = p + s q + ...
    z1 = torch.randn(n, 2, dtype=torch.float64) * SD
    x0 = p + scale * q + s * z1 / SD                                             # exact at every s
    t = tf.sample_t(n, 0.4, 2.0).to(torch.float64)
    z = torch.randn_like(x0) * SD
    centers = mu_u + torch.linspace(1, 2, 64, dtype=torch.float64)[:, None] * (mu_c - mu_u)   # pooled over s
    pooled = tf.F_from_denoiser(mixture_denoiser(centers, s.mean()))
    grads = {}
    for name, F_fake in (('sees s', F_teacher(mu_s, s)), ('ignores s', pooled)):
        loss, _ = tf.avsd_loss(x0, F_teacher(mu_s, s), F_fake, t, z)
        grads[name] = torch.cat(torch.autograd.grad(loss, (p, q), retain_graph=True)).abs().max().item()
    assert grads['sees s'] == 0 and grads['ignores s'] > 1e-2, grads


def test_vsd_losses_give_the_fake_score_s_and_score_in_eval_mode():
    """train_scd.vsd_losses: F_phi is called with each sample's CFG scale s, in eval mode when it scores the
    student's samples (no dropout) and in train mode for its own diffusion loss."""
    import train_scd
    calls = []

    class Fake(torch.nn.Module):
        def forward(self, u, t, labels, s=None):
            calls.append((s, self.training))
            return torch.zeros_like(u)
    net = lambda u, t, labels, s=None: torch.zeros_like(u)                       # noqa: E731
    x0, labels, s = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2]), torch.tensor([1.2, 1.5, 1.9])
    fake = Fake().train()
    train_scd.vsd_losses(net, net, fake, x0, labels, s, P_vsd=(0.4, 2.0), P_fake=(-0.8, 1.6))
    assert [(c is s, training) for c, training in calls] == [(True, False), (True, True)] and fake.training, calls


def test_avsd_alone_moves_a_gaussian_generator_to_the_data():
    """Gradient steps on the VSD loss alone, the fake score kept exact (a perfectly trained F_phi), take N(a, b^2)
    from far off to the data's N(mu, s^2)."""
    mu, s = gauss_params(D=4)
    a, b = torch.zeros_like(mu), torch.full_like(s, 0.9)
    kl = lambda a, b: (torch.log(s / b) + (b ** 2 + (a - mu) ** 2) / (2 * s ** 2) - 0.5).sum()
    start = kl(a, b)
    for step in range(150):
        ga, gb = _vsd_grads(a, b, mu, s, n=2000, seed=step)
        a, b = a - 0.05 * ga, b - 0.05 * gb
    assert kl(a, b) < 0.05 * start, (start, kl(a, b))


def test_pseudo_huber_is_quadratic_then_linear():
    """iCT's metric: ~ ||x - y||^2 / (2c) for differences << c, ~ ||x - y|| - c for differences >> c, with
    c = 0.00054 sqrt(d) (CIFAR-10's d = 3072: c = 0.0299)."""
    x = torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    c = 0.00054 * math.sqrt(3072)
    assert abs(c - 0.0299) < 1e-4
    small, big = torch.full_like(x, 1e-5), torch.full_like(x, 0.5)
    d2 = small.flatten(1).square().sum(1)
    assert torch.allclose(bl.pseudo_huber(small, x), d2 / (2 * c), rtol=1e-4)
    dist = big.flatten(1).norm(dim=1)
    assert torch.allclose(bl.pseudo_huber(big, x), dist - c, rtol=1e-4)


def test_discretization_curricula_follow_their_papers():
    """iCT (Eq. 7; K = 400k, s0 = 10, s1 = 1280: K' = 50000): N = 11 until step 50k, then 21, ... 1281 from 350k.
    CM 2023 (App. C; CT on CIFAR-10, K = 800k, s0 = 2, s1 = 150, mu0 = 0.9): N(0) = 2 with mu = 0.9, N(K) = 151."""
    K = 400_000
    assert [bl.ict_num_steps(k, K) for k in (0, 49_999, 50_000, 100_000, 300_000, 349_999, 350_000, 399_999)] == \
        [11, 11, 21, 41, 641, 641, 1281, 1281]
    N0, mu0 = bl.cm2023_schedule(0, 800_000)
    NK, muK = bl.cm2023_schedule(800_000, 800_000)
    assert (N0, NK) == (2, 151) and abs(mu0 - 0.9) < 1e-12 and abs(muK - math.exp(2 * math.log(0.9) / 151)) < 1e-12
    sigmas = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    p = bl.ict_interval_probs(sigmas)
    torch.manual_seed(0)
    draws = torch.exp(torch.randn(200_000, dtype=torch.float64) * 2.0 - 1.1)
    draws = draws[(draws >= 0.002) & (draws <= 80.0)]                          # the law inside the grid
    freq = torch.bincount(torch.bucketize(draws, sigmas[1:-1]), minlength=4).double() / len(draws)
    assert torch.allclose(p, freq, atol=0.005) and abs(p.sum() - 1) < 1e-12     # the log-normal's mass per interval


def test_heun_step_is_cds_ode_step_of_a_gaussian_teacher():
    """CD's x_t' (trigflow.heun_step) against the exact PF-ODE flow of a Gaussian teacher: EDM's Heun is 2nd order,
    so one step's error falls ~8x when the step halves; to t' = 0 it is Euler's step, which lands on the denoiser."""
    mu, s = gauss_params(D=5)
    torch.manual_seed(0)
    t = torch.linspace(0.3, 1.4, 8, dtype=torch.float64)
    x_t = gauss_marginal(t, mu, s)
    F = F_teacher(mu, s)
    errs = [rel(bl.heun_step(F, x_t, t, t - dt), gauss_transport(x_t, t, t - dt, mu, s)) for dt in (0.08, 0.04, 0.02)]
    assert errs[2] < 1e-5 and errs[0] / errs[1] > 6 and errs[1] / errs[2] > 6, errs
    t_prev = torch.where(torch.arange(8) % 2 == 0, torch.zeros(8, dtype=torch.float64), t - 0.04)   # mixed batch
    x_prev = bl.heun_step(F, x_t, t, t_prev)
    assert torch.allclose(x_prev[0::2], tf.consistency_fn(F, x_t, t)[0::2], rtol=0, atol=1e-12)
    assert rel(x_prev[1::2], gauss_transport(x_t, t, t_prev, mu, s)[1::2]) < 1e-4


@pytest.mark.parametrize('kind', ['ct', 'cd', 'ict'])
def test_discrete_cm_gradient_tends_to_scms_as_dt_shrinks(kind):
    """The discrete CM loss of the training scripts (trigflow.cm_loss) against sCM's (scm_loss, unit weight, r = 1, no
    normalization): per sample, d/dt of the pair's gap is the tangent, so lambda * grad of the discrete loss, rescaled
    by 1 / (sigma sin(t - t')) and the metric's small-gap factor, tends to sCM's gradient as dt -> 0, with an error
    that shrinks in proportion. ct: x_t' from the same z with L2, lambda = 1; cd: one Heun step of a Gaussian teacher;
    ict: CT with iCT's pseudo-Huber (~ ||.||^2 / 2c) and lambda = 1 / (sigma - sigma')."""
    D = 4
    mu, s = gauss_params(D=D)
    torch.manual_seed(0)
    net = model.MLP(dim=D, hidden=32, depth=2).double()
    B = 6
    t = torch.linspace(0.2, 1.4, B, dtype=torch.float64)
    x0 = mu + s * torch.randn(B, D, dtype=torch.float64)
    z = torch.randn(B, D, dtype=torch.float64) * SD
    x_t, dxdt = tf.forward_process(x0, t, z)
    if kind == 'cd':
        x_t = gauss_marginal(t, mu, s)
        dxdt = tf.velocity(F_teacher(mu, s), x_t, t)
    net.zero_grad()
    tf.scm_loss(net, x_t, t, dxdt, r=1.0, c=None)[0].backward()
    g_scm = _flat_grad(net)
    c = 0.01
    errs = []
    for dt in (1e-2, 1e-3, 1e-4):
        net.zero_grad()
        t_prev = t - dt
        x_prev = bl.heun_step(F_teacher(mu, s), x_t, t, t_prev) if kind == 'cd' else tf.forward_process(x0, t_prev, z)[0]
        sigma, dsigma = SD * t.tan(), SD * (t.tan() - t_prev.tan())
        for i in range(B):                                      # one sample at a time: each has its own rescaling
            one = slice(i, i + 1)
            if kind == 'ict':
                loss, _ = bl.cm_loss(net, net, x_t[one], t[one], x_prev[one], t_prev[one], metric='pseudo-huber',
                                     c=c, weighting='inv-dsigma')
                scale = 2 * c / D * dsigma[i] / (sigma[i] * math.sin(dt))
            else:
                loss, _ = bl.cm_loss(net, net, x_t[one], t[one], x_prev[one], t_prev[one])
                scale = 1 / (sigma[i] * math.sin(dt))
            (loss * scale / B).backward()
        errs.append(rel(_flat_grad(net), g_scm))
    assert errs[2] < 3e-3 and errs[1] / errs[2] > 5 and errs[0] / errs[1] > 5, errs


def test_cm_loss_target_sees_the_students_dropout_mask_and_no_gradient():
    """iCT's target theta- = stopgrad theta runs with the student's dropout mask (iCT §3.1): with x_t' = x_t and
    t' = t the loss is exactly 0 through a network with dropout, and no gradient reaches the target. The two metrics
    and weightings are their formulas."""
    net = tiny_unet(dropout=0.5).train()
    x_t, t = torch.randn(3, 1, 16, 16), torch.tensor([0.4, 0.9, 1.3])
    loss, _ = bl.cm_loss(net, net, x_t, t, x_t, t)
    assert loss.item() == 0.0
    a, b = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    F_a, F_b = (lambda u, t: a), (lambda u, t: b)                  # networks with constant outputs
    t_prev = torch.tensor([0.0, 0.5, 1.0])
    f = lambda F, t: tf.consistency_fn(F, x_t, t)
    gap = f(F_a, t) - f(F_b, t_prev)
    l2, terms = bl.cm_loss(F_a, F_b, x_t, t, x_t, t_prev)
    assert torch.allclose(l2, gap.square().mean()) and torch.allclose(terms['dt'], (t - t_prev).mean())
    ph, _ = bl.cm_loss(F_a, F_b, x_t, t, x_t, t_prev, metric='pseudo-huber', weighting='inv-dsigma')
    c = 0.00054 * 16
    want = ((gap.flatten(1).square().sum(1) + c * c).sqrt() - c) / (SD * (t.tan() - t_prev.tan()))
    assert torch.allclose(ph, want.mean())


def test_grid_intervals_follow_cm_and_ict():
    """CM 2023's grid: N Karras times from 0.002 to 80 (rho = 7) with the first at t = 0; intervals uniform (CM 2023) or
    by iCT's discretized log-normal, counted over many draws."""
    ts = bl.discrete_times(17)
    sigma = SD * ts.double().tan()
    i = torch.arange(1, 17, dtype=torch.float64)
    want = (0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert len(ts) == 18 and ts[0] == 0 and torch.allclose(sigma[1:-1], want, rtol=1e-5) and abs(sigma[-1] - 80) < 1e-3
    g = torch.Generator().manual_seed(0)
    for P in ((None, None), (-1.1, 2.0)):
        t, t_prev = bl.sample_interval(100_000, ts, *P, generator=g)
        idx = torch.searchsorted(ts, t_prev)
        assert torch.equal(ts[idx + 1], t)                                   # adjacent grid points
        freq = torch.bincount(idx, minlength=17).double() / len(idx)
        p = torch.full((17,), 1 / 17, dtype=torch.float64) if P[0] is None else bl.ict_interval_probs(sigma, *P)
        assert torch.allclose(freq, p, atol=0.005), (P, freq, p)


def test_scm_gradient_is_limit_of_discrete_consistency_gradient():
    """sCM's gradient (Eq. 8 with unit w, r = 1, no normalization) equals the dt -> 0 limit of the discrete CM
    gradient  w(t)/D * grad ||f_theta(x_t, t) - f_theta-(x_{t-dt}, t-dt)||^2 / dt  with the prior weight
    w(t) = 1/(sd tan t) (sCM §4.2), where x_{t-dt} follows the exact PF-ODE of the (Gaussian) teacher."""
    mu, s = gauss_params(D=4)
    torch.manual_seed(0)
    net = model.MLP(dim=4, hidden=32, depth=2).double()
    B = 8
    t = torch.linspace(0.15, 1.45, B, dtype=torch.float64)
    x_t = gauss_marginal(t, mu, s)
    dxdt = gauss_velocity(x_t, t, mu, s)

    net.zero_grad()
    loss, _ = tf.scm_loss(net, x_t, t, dxdt, r=1.0, c=None)
    loss.backward()
    g_scm = _flat_grad(net)

    errs = []
    for dt in (1e-2, 1e-3, 1e-4):
        net.zero_grad()
        x_prev = gauss_transport(x_t, t, t - dt, mu, s)
        with torch.no_grad():
            f_minus = tf.consistency_fn(net, x_prev, t - dt)
        d = (tf.consistency_fn(net, x_t, t) - f_minus).square().sum(1)             # ||.||^2 per sample
        w_prior = 1 / (SD * t.tan())
        (w_prior / 4 * d / dt).mean().backward()
        errs.append(rel(_flat_grad(net), g_scm))
    assert errs[2] < 2e-3 and errs[2] < errs[1] < errs[0], errs


def test_discrete_tangent_converges_to_continuous():
    """dsCD's finite-difference tangent (Eq. 37) -> the JVP tangent, and its loss gradient -> sCM's, as dt -> 0.
    sCT's dxdt makes the DDIM step exact, so the only error is the finite difference."""
    torch.manual_seed(0)
    net = tiny_unet(torch.float64)
    x0 = torch.randn(3, 1, 16, 16, dtype=torch.float64) * SD
    z = torch.randn_like(x0) * SD
    t = torch.tensor([0.2, 0.7, 1.3], dtype=torch.float64)
    x_t, dxdt = tf.forward_process(x0, t, z)
    _, g = tf.scm_tangent(net, x_t, t, dxdt)
    errs = [rel(bl.dscd_tangent(net, x_t, t, dxdt, dt)[1], g) for dt in (1e-2, 1e-3, 1e-4)]
    assert errs[2] < 1e-3 and errs[2] < errs[1] < errs[0], errs
    # the DDIM step with sCT's dxdt lands exactly on cos t' x0 + sin t' z ...
    dt = 0.3
    x_prev = math.cos(dt) * x_t - math.sin(dt) * dxdt
    assert rel(x_prev, tf.forward_process(x0, t - dt, z)[0]) < 1e-12
    # ... and at any finite dt Eq. 37 is exactly cos(t) [f(x_t, t) - f(x_t', t')] / sin(t - t')
    direct = (tf.consistency_fn(net, x_t, t) - tf.consistency_fn(net, x_prev, t - dt)) / math.sin(dt)
    assert rel(bl.dscd_tangent(net, x_t, t, dxdt, dt)[1], _col(t.cos(), x_t) * direct) < 1e-12


def test_gaussian_consistency_function_is_fixed_point_of_scd():
    """With the exact teacher velocity of Gaussian data, the exact consistency function has zero tangent g (so it
    is a fixed point of the sCD update), while the teacher's own denoiser, which is not consistent, does not."""
    mu, s = gauss_params()
    torch.manual_seed(0)
    t = torch.rand(64, dtype=torch.float64) * 1.5 + 0.03
    x_t = gauss_marginal(t, mu, s)
    dxdt = SD * F_teacher(mu, s)(x_t / SD, t)
    _, g = tf.scm_tangent(F_consistency(mu, s), x_t, t, dxdt)
    _, g_wrong = tf.scm_tangent(F_teacher(mu, s), x_t, t, dxdt)
    assert g.abs().max() < 1e-10, g.abs().max()
    assert g_wrong.abs().max() > 1e-2
    # the closed forms agree with each other: f* along the exact ODE is constant (finite difference of transport)
    x_next = gauss_transport(x_t, t, t - 1e-3, mu, s)
    assert rel(gauss_f(x_next, t - 1e-3, mu, s), gauss_f(x_t, t, mu, s)) < 1e-12


class GaussianCM(torch.nn.Module):
    """A consistency model restricted to the exact Gaussian family, with learnable mean and std."""

    def __init__(self, D):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
        self.log_s = torch.nn.Parameter(torch.full((D,), math.log(SD), dtype=torch.float64))

    def forward(self, u, t):
        return F_consistency(self.mu, self.log_s.exp())(u, t)


def test_scd_moves_a_model_to_the_analytic_consistency_function():
    """sCD against the exact Gaussian teacher (adaptive weight, warmup, RMS tangent normalization, log-normal
    proposal) drives a model of the Gaussian family to the true mean and std."""
    mu, s = gauss_params()
    torch.manual_seed(0)
    net, wnet = GaussianCM(6), tf.AdaptiveWeight().double()
    opt = torch.optim.Adam(list(net.parameters()) + list(wnet.parameters()), lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    err0 = (net.mu - mu).abs().max().item(), (net.log_s.exp() - s).abs().max().item()
    for step in range(300):
        t = tf.sample_t(256, -0.8, 1.6).double()
        x_t = gauss_marginal(t, mu, s)
        dxdt = gauss_velocity(x_t, t, mu, s)
        loss, _ = tf.scm_loss(net, x_t, t, dxdt, w=wnet(t).double(), r=tf.tangent_warmup(step, 50))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    err1 = (net.mu - mu).abs().max().item(), (net.log_s.exp() - s).abs().max().item()
    assert min(err0) > 0.2 and max(err1) < 1e-3, (err0, err1)


def test_diffusion_loss_learns_the_gaussian_teacher():
    """The TrigFlow diffusion loss (Eq. 4) with adaptive weighting drives a velocity model of the Gaussian family to
    the true mean and std: its minimizer is the PF-ODE velocity."""
    mu, s = gauss_params()
    torch.manual_seed(0)
    p_mu = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    p_ls = torch.nn.Parameter(torch.full((6,), math.log(SD), dtype=torch.float64))
    wnet = tf.AdaptiveWeight().double()
    opt = torch.optim.Adam([p_mu, p_ls] + list(wnet.parameters()), lr=2e-2)
    for _ in range(300):
        x0 = mu + s * torch.randn(512, 6, dtype=torch.float64)
        t = tf.sample_t(512, -0.8, 1.6).double()
        loss, _ = tf.diffusion_loss(F_teacher(p_mu, p_ls.exp()), x0, t, torch.randn_like(x0) * SD, w=wnet(t).double())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (p_mu - mu).abs().max() < 0.03 and (p_ls.exp() - s).abs().max() < 0.03


def test_dropout_masks_match():
    """two_pass=True: the tangent pass and the gradient pass see the same dropout mask: the loss equals the weighted
    norm of the tangent computed with the first mask, and its gradient equals that of a one-pass form built on that
    same mask."""
    net = tiny_unet(dropout=0.5).train()
    x_t, t = torch.randn(4, 1, 16, 16) * SD, torch.rand(4) + 0.2
    dxdt = torch.randn_like(x_t) * SD
    rng = torch.get_rng_state()
    loss, terms = tf.scm_loss(net, x_t, t, dxdt, c=None, two_pass=True)
    net.zero_grad()
    loss.backward()
    grad = _flat_grad(net)
    torch.set_rng_state(rng)
    _, g = tf.scm_tangent(net, x_t, t, dxdt)                                     # the first mask again
    assert abs(terms['mse'].item() - g.square().mean().item()) < 1e-6 * g.square().mean().item()
    torch.set_rng_state(rng)                                                     # one pass, the same mask
    F_theta = net(x_t / SD, t)
    net.zero_grad()
    (F_theta - F_theta.detach() - g).square().flatten(1).mean(1).mean().backward()
    assert rel(grad, _flat_grad(net)) < 1e-5
    # with another mask the gradient differs (so the check above can fail)
    F_other = net(x_t / SD, t)
    net.zero_grad()
    (F_other - F_other.detach() - g).square().flatten(1).mean(1).mean().backward()
    assert rel(grad, _flat_grad(net)) > 0.05


def test_adaptive_weight_reaches_its_optimum():
    """Minimizing e^w * mse - w gives e^{w*(t)} = 1 / E[mse | t] (App. D)."""
    torch.manual_seed(0)
    wnet = tf.AdaptiveWeight()
    h = lambda t: 0.05 + t.sin() ** 2                                            # E[mse | t]
    opt = torch.optim.Adam(wnet.parameters(), lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 600)
    for _ in range(600):
        t = tf.sample_t(1024, -0.8, 1.6)
        mse = h(t) * (0.5 + torch.rand_like(t))                                  # any positive noise with mean h
        w = wnet(t)
        loss = (w.exp() * mse - w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    t = tf.t_from_sigma(torch.exp(torch.linspace(-2.4, 0.8, 9)))               # the bulk of the proposal
    ratio = wnet(t).exp() * h(t)
    assert (ratio - 1).abs().max() < 0.03, ratio


def test_tangent_normalization_bounds_the_norm():
    torch.manual_seed(0)
    g = torch.randn(5, 3, 8, 8) * torch.tensor([1e-4, 1e-2, 1.0, 1e2, 1e4]).reshape(5, 1, 1, 1)
    for kind in ('rms', 'l2'):
        n = tf.normalize_tangent(g, 0.1, kind).flatten(1).norm(dim=1)
        n = n / math.sqrt(192) if kind == 'rms' else n
        assert (n < 1).all()
        assert abs(n[-1].item() - 1) < 1e-4                                       # large tangents -> unit norm
        norm0 = g[0].norm() / (math.sqrt(192) if kind == 'rms' else 1)
        assert abs(n[0].item() / (norm0.item() / 0.1) - 1) < 0.02                 # small ones: ~ ||g|| / c
    # direction is kept
    gn = tf.normalize_tangent(g, 0.1)
    cos = torch.nn.functional.cosine_similarity(gn.flatten(1), g.flatten(1))
    assert (cos > 1 - 1e-6).all()
    with pytest.raises(ValueError):
        tf.normalize_tangent(g, 0.1, 'linf')


def test_time_proposals():
    torch.manual_seed(0)
    t = tf.sample_t(200000, -0.8, 1.6)
    log_sigma = (SD * t.double().tan()).log()
    assert abs(log_sigma.median().item() + 0.8) < 0.02
    assert t.min() >= tf.T_MIN and t.max() <= tf.T_MAX
    ts = bl.discrete_times(1024)
    assert ts[0] == 0 and abs(ts[-1].item() - tf.T_MAX) < 1e-6 and (ts.diff() > 0).all()
    t_d, t_prev = bl.sample_interval(200000, ts, -0.8, 1.6)
    assert torch.equal(torch.searchsorted(ts, t_prev), torch.searchsorted(ts, t_d) - 1)
    assert abs((SD * t_d.double().tan()).log().median().item() + 0.8) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# Networks


PAPER_PARAMS_M = {  # sCM Table 5 (ImageNet 512 latents) and Table 4 (ImageNet 64 pixels), millions
    's': 280.2, 'm': 497.8, 'l': 777.6, 'xl': 1119.4, 'xxl': 1523.4,
    'img64-s': 280.2, 'img64-m': 497.8, 'img64-l': 777.6, 'img64-xl': 1119.4,
}


@pytest.mark.parametrize('name', list(PAPER_PARAMS_M))
def test_param_counts_match_paper_tables(name):
    with torch.device('meta'):
        net = model.UNet(**model.UNET_PRESETS[name])
        edm2 = model.UNet(**model.UNET_PRESETS[name], edm2=True)          # EDM2's network as its checkpoints hold it
    n = sum(p.numel() for p in net.parameters()) / 1e6
    assert n == sum(p.numel() for p in edm2.parameters()) / 1e6                # ADN without a shift: EDM2's count
    assert abs(n / PAPER_PARAMS_M[name] - 1) < 0.01, n                         # L-XXL: the tables list 0.1-0.24M more


def test_dit_param_count_matches_dit_paper():
    with torch.device('meta'):
        net = model.DiT(input_size=32, in_channels=4, patch_size=2, **model.DIT_PRESETS['DiT-XL'])
    n = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(n / 675 - 1) < 0.01, n                                            # DiT-XL/2: 675M (DiT Table 4)


def test_unet_attention_is_edm2s_over_pixels(tmp_path):
    """The U-Net block's self-attention against EDM2's Block written out here (networks_edm2.py: qkv reshaped to
    [B, heads, c, 3, HW], pixel norm over c, softmax over pixels, proj, mp_sum with 0.3). A checkpoint from before
    2026-12-04 (no attention_axis) keeps the layout it was trained with, across channels, which is not EDM2's."""
    torch.manual_seed(0)
    blk = randomize_(model.Block(32, 32, 16, attention=True, channels_per_head=16)).double()
    x, emb = torch.randn(2, 32, 5, 5, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        blk.num_heads = 0
        before = blk(x, emb)                                      # the block without its attention
        blk.num_heads = 2
        y = blk.attn_qkv(before).reshape(2, 2, -1, 3, 25)
        y = y / (y.norm(dim=2, keepdim=True) / math.sqrt(16) + 1e-4)        # EDM2's normalize(dim=2)
        q, k, v = y.unbind(3)                                                # [B, heads, c, HW]
        w = torch.einsum('nhcq,nhck->nhqk', q, k / math.sqrt(16)).softmax(dim=3)
        a = blk.attn_proj(torch.einsum('nhqk,nhck->nhcq', w, v).reshape(2, 32, 5, 5))
        want = (before.lerp(a, 0.3) / math.sqrt(0.7 ** 2 + 0.3 ** 2))
        assert torch.allclose(blk(x, emb), want, rtol=1e-10, atol=1e-12)
        blk.attention_axis = 'channels'
        assert not torch.allclose(blk(x, emb), want, rtol=1e-3)
    old = dict(model.UNET_PRESETS['tiny'], arch='unet')                       # a checkpoint's kwargs before the fix
    assert model.build(old).enc['8x8_block0'].attention_axis == 'channels'
    assert model.build(dict(old, attention_axis='pixels')).enc['8x8_block0'].attention_axis == 'pixels'
    import train_util                                # a student keeps its teacher's layout, so it starts as it
    files = (dict(model_kwargs=old), dict(model_kwargs=dict(old, attention_axis='pixels')), None)
    assert [train_util.teacher_attention_axis(f) for f in files] == \
        ['channels', 'pixels', 'pixels']


def test_time_embeddings_are_the_upstream_ones():
    """c_noise(t) = t enters as DiT's timestep_embedding (cos, sin; frequencies 10000^(-k/half)) and EDM's DDPM++
    PositionalEmbedding (endpoint: the last frequency 1/10000), both unscaled; the EDM2 U-Net's is sqrt(2) times
    that, unit RMS as EDM2's magnitude-preserving Fourier features it replaces."""
    t = torch.tensor([0.0, 0.3, 1.2, 1.5])
    half = 8
    dit = torch.exp(-math.log(10000) * torch.arange(half) / half)
    edm = (1 / 10000) ** (torch.arange(half) / (half - 1))
    ref = lambda f: torch.cat([(t[:, None] * f).cos(), (t[:, None] * f).sin()], dim=1)
    assert torch.allclose(model.DiT(input_size=4, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                    label_dim=0, time_channels=16).emb_time(t), ref(dit), atol=1e-6)
    assert torch.allclose(model.PositionalEmbedding(16, endpoint=True)(t), ref(edm), atol=1e-6)
    ddpmpp = model.DDPMpp(img_resolution=8, img_channels=1, model_channels=16, channel_mult=(1,), num_blocks=1,
                          attn_resolutions=())
    assert torch.allclose(ddpmpp.emb_time(t), ref(edm), atol=1e-6)
    unet = model.UNet(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[])
    assert torch.allclose(unet.emb_time(t), math.sqrt(2) * ref(dit), atol=1e-6)
    assert torch.allclose(unet.emb_time(t).square().mean(1), torch.ones(4))              # unit RMS at every t


def test_ddpmpp_is_edms_cifar10_network_plus_the_adn_shift():
    """The cifar10 network is EDM's SongUNet `--arch=ddpmpp` (55,732,739 parameters without the augmentation input,
    counted by instantiating EDM's training/networks.py) plus, per block, the emb -> C map of ADN's shift: the same
    33 blocks, widths and layers. The layer EDM zero-inits leaves F ~ 0 at the start, as EDM's output."""
    with torch.device('meta'):
        net = model.build(dict(model.DDPMPP_PRESETS['cifar10'], arch='ddpmpp'))
    blocks = [m for m in net.modules() if isinstance(m, model.DDPMppBlock)]
    adn_shift = sum(b.affine.in_features * b.out_channels + b.out_channels for b in blocks)
    n = sum(p.numel() for p in net.parameters())
    assert len(blocks) == 33 and n - adn_shift == 55_732_739, (len(blocks), n, adn_shift)
    print(f'DDPM++ (cifar10): {n / 1e6:.2f}M parameters; EDM\'s DDPM++ {55_732_739 / 1e6:.2f}M (+0.001M augment input)')
    torch.manual_seed(0)
    small = model.DDPMpp(model_channels=16, num_blocks=1)
    assert small(torch.randn(2, 3, 32, 32), torch.rand(2)).abs().max() < 1e-2
    with pytest.raises(ValueError, match='CFG'):
        model.DDPMpp(cfg_embed=True)


def test_cfg_input_starts_as_the_teacher():
    """A student with the CFG-scale input, loaded from a teacher without it, computes the teacher's F exactly."""
    teacher = tiny_unet(label_dim=4)
    student = model.UNet(**dict(model.UNET_PRESETS['tiny'], label_dim=4, cfg_embed=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all('cfg' in k for k in missing)
    u, t, y = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([0, 3, -1])
    assert torch.equal(student(u, t, y, s=torch.tensor([1.0, 1.5, 2.0])), teacher(u, t, y))
    with torch.no_grad():
        student.cfg_gain.fill_(1.0)
    assert not torch.equal(student(u, t, y, s=torch.tensor([1.0, 1.5, 2.0])), teacher(u, t, y))


def test_labels_and_guidance():
    net = tiny_unet(label_dim=4)
    u, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    null = torch.tensor([-1, -1])
    assert torch.equal(net(u, t), net(u, t, null))
    assert not torch.equal(net(u, t, torch.tensor([0, 1])), net(u, t, null))
    Fc, Fu = (lambda u, t: net(u, t, torch.tensor([2, 2]))), (lambda u, t: net(u, t, null))
    assert torch.allclose(tf.guided(Fc, Fu, 1.0)(u, t), Fc(u, t), atol=1e-6)
    assert torch.allclose(tf.guided(Fc, Fu, 0.0)(u, t), Fu(u, t), atol=1e-6)
    s = torch.tensor([1.5, 2.0])
    expect = Fu(u, t) + s.reshape(2, 1, 1, 1) * (Fc(u, t) - Fu(u, t))
    assert torch.allclose(tf.guided(Fc, Fu, s)(u, t), expect, atol=1e-6)


def test_forced_weight_normalization_keeps_the_function():
    """project_weights_ (EDM2's forced weight normalization, outside forward) leaves F unchanged."""
    net = tiny_unet()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    u, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    before = net(u, t)
    model.project_weights_(net)
    assert rel(net(u, t), before) < 1e-3                                      # up to EDM2's eps = 1e-4 per layer
    w = net.out_conv.weight
    assert torch.allclose(w.flatten(1).square().mean(1), torch.ones(w.shape[0]), atol=1e-3)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match='divisible'):
        model.UNet(img_resolution=28, img_channels=1, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match='divisible'):
        model.DiT(input_size=30, patch_size=4)


@pytest.mark.parametrize('make,shape', [(tiny_unet, (2, 1, 16, 16)), (tiny_dit, (2, 2, 8, 8)),
                                        (tiny_ddpmpp, (2, 2, 8, 8))])
def test_embedding_and_modulation_stay_fp32_under_autocast(make, shape):
    """EDM2 keeps c_noise, the embedding and the per-block modulation in fp32 while the body runs in bf16/fp16."""
    net = make(label_dim=3, cfg_embed=True) if make is tiny_unet else make() if make is tiny_ddpmpp else \
        make(cfg_embed=True)
    seen = {}
    for name, m in net.named_modules():
        if name.endswith(('emb_noise', 'emb_linear', 'modulation', 'time_mlp', 'conv_res0', 'qkv', 'map1', 'affine',
                          'conv0')):
            m.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name.split('.')[-1], set()).add(o.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        net(torch.randn(shape), torch.rand(shape[0]), torch.tensor([0, 1]), torch.full((shape[0],), 1.5))
    fp32 = {tiny_unet: {'emb_noise', 'emb_linear'}, tiny_dit: {'modulation', 'time_mlp'},
            tiny_ddpmpp: {'map1', 'affine'}}[make]
    body = {tiny_unet: 'conv_res0', tiny_dit: 'qkv', tiny_ddpmpp: 'conv0'}[make]
    assert all(seen[k] == {torch.float32} for k in fp32), seen
    assert seen[body] == {torch.bfloat16}, seen                                 # so the test can tell


def test_teacher_dropout_in_every_block_students_at_low_resolution(monkeypatch):
    """EDM2 config G (the teachers, App. G.1) drops out in every block; the consistency models only at <= 16 (G.2)."""
    import types
    import train_util
    monkeypatch.setitem(model.UNET_PRESETS, 's', dict(model.UNET_PRESETS['s'], model_channels=8, channels_per_head=8))
    ds = types.SimpleNamespace(shape=(4, 64, 64), num_classes=1000, name='latents')
    args = types.SimpleNamespace(model='s', dropout=0.1)
    for everywhere, want in ((True, {64, 32, 16, 8}), (False, {16, 8})):
        net = model.build(train_util.model_kwargs_for(args, ds, dropout_everywhere=everywhere))
        res = {int(name.split('x')[0]) for name, blk in {**net.enc, **net.dec}.items()
               if isinstance(blk, model.Block) and blk.dropout == 0.1}
        assert res == want, (everywhere, res)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA (run gpu_check.sh on a GPU machine)'))])
@pytest.mark.parametrize('make,shape', [(tiny_unet, (4, 1, 16, 16)), (tiny_dit, (4, 2, 8, 8)),
                                        (tiny_ddpmpp, (4, 2, 8, 8))])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_autocast_jvp(make, shape, dtype, device):
    """The sCM tangent under bf16/fp16 autocast is finite at both ends of [0, pi/2] (where 1/sin or 1/cos would
    overflow fp16 without the JVP rearrangement of §5.1) and close to fp32's; on CUDA with TF32 off for the reference."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net = make().to(device)
    torch.manual_seed(0)
    x_t = torch.randn(shape, device=device) * SD
    t = torch.tensor([tf.T_MIN, 0.3, 1.2, tf.T_MAX], device=device)
    dxdt = torch.randn_like(x_t) * SD
    _, g32 = tf.scm_tangent(net, x_t, t, dxdt)
    with torch.autocast(device, dtype=dtype):
        _, g16 = tf.scm_tangent(net, x_t, t, dxdt)
        loss, terms = tf.scm_loss(net, x_t, t, dxdt)
    assert g16.dtype == torch.float32 and torch.isfinite(g16).all() and torch.isfinite(loss)
    assert rel(g16, g32) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# The one-pass step (trigflow.scm_loss, issue 20): equal to the two-pass form every public sCM code runs, and
# autograd records no tangent.


def tiny_mlp(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return randomize_(model.MLP(dim=6, hidden=16, depth=2, label_dim=3, **kw)).to(dtype)


NETS = {'unet': (tiny_unet, (3, 1, 16, 16)), 'ddpmpp': (tiny_ddpmpp, (3, 2, 8, 8)), 'dit': (tiny_dit, (3, 2, 8, 8)),
        'mlp': (tiny_mlp, (3, 6))}


def two_pass_reference(F, x_t, t, dxdt, w, r, c=0.1, dt=None):
    """Alg. 1 as written, in two passes: the tangent g from a no-grad pass (torch.func.jvp; for dsCD, dscd_tangent,
    whose Eq. 37 test_discrete_tangent_converges_to_continuous checks against cos(t) [f(x_t, t) - f(x_t', t')] /
    sin(t - t')), normalized by its RMS norm + c; then a second forward with gradient on the same dropout mask (the
    RNG put back); loss e^w ||F - F.detach() - g||^2 / D - w."""
    rng = torch.get_rng_state()
    cos, sin = _col(t.cos(), x_t), _col(t.sin(), x_t)
    with torch.no_grad():
        if dt is None:
            F_minus, cs_dFdt = torch.func.jvp(F, (x_t / SD, t), (cos * sin * dxdt / SD, t.cos() * t.sin()))
            g = -cos ** 2 * (SD * F_minus - dxdt) - r * (cos * sin * x_t + SD * cs_dFdt)
        else:
            _, g = bl.dscd_tangent(F, x_t, t, dxdt, dt, r=r)
        g = g / _col(g.flatten(1).norm(dim=1) / math.sqrt(g[0].numel()) + c, g)
    torch.set_rng_state(rng)
    F_theta = F(x_t / SD, t)
    mse = (F_theta - F_theta.detach() - g).square().flatten(1).mean(1)
    return (w.exp() * mse - w).mean()


def _grads(*modules):
    return {f'{i}.{n}': p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize('mode', ['sCT', 'sCD', 'sCD-guided', 'dsCD'])
@pytest.mark.parametrize('arch', list(NETS))
def test_one_pass_equals_two_pass_reference(arch, mode, dtype, tol):
    """The loss and every parameter's gradient (of F_theta and of w_phi) of the one-pass scm_loss equal the two-pass
    reference's, with dropout on, so the one pass sees the reference's mask; two_pass=True equals it too."""
    make, shape = NETS[arch]
    guided = mode == 'sCD-guided'
    net = make(dtype, dropout=0.3, **(dict(cfg_embed=True) if guided and arch in ('unet', 'dit') else {})).train()
    wnet = tf.AdaptiveWeight().to(dtype)
    torch.nn.init.normal_(wnet.linear.weight, std=0.3)
    torch.manual_seed(1)
    x0, z = torch.randn(shape, dtype=dtype) * SD, torch.randn(shape, dtype=dtype) * SD
    t = torch.tensor([0.1, 0.8, 1.5], dtype=dtype)
    labels, s = torch.tensor([0, 2, -1]), torch.tensor([1.0, 2.5, 4.0], dtype=dtype)
    x_t, dxdt = tf.forward_process(x0, t, z)
    if mode != 'sCT':                                           # a teacher: another network, no dropout, no grad
        teacher = make(dtype).eval().requires_grad_(False)
        randomize_(teacher, seed=5)
        F_teacher = lambda u, t: teacher(u, t, labels)
        if guided:
            F_teacher = tf.guided(F_teacher, lambda u, t: teacher(u, t, torch.full_like(labels, -1)), s)
        dxdt = tf.velocity(F_teacher, x_t, t)
    F = lambda u, t: net(u, t, labels, s if guided else None)
    dt, r = (0.05 if mode == 'dsCD' else None), 0.7
    results = []
    for kind in ('reference', 'one pass', 'two_pass=True'):
        torch.manual_seed(7)
        net.zero_grad(set_to_none=True), wnet.zero_grad(set_to_none=True)
        if kind == 'reference':
            loss = two_pass_reference(F, x_t, t, dxdt, wnet(t), r, dt=dt)
        else:
            loss_fn = tf.scm_loss if dt is None else (lambda *a, **k: bl.dscd_loss(*a, dt=dt, **k))   # App. E
            loss, _ = loss_fn(F, x_t, t, dxdt, w=wnet(t), r=r, two_pass=kind != 'one pass')
        loss.backward()
        results.append((loss.detach(), _grads(net, wnet), torch.randn(())))
    (loss_ref, grads_ref, after_ref) = results[0]
    assert len(grads_ref) == len(list(net.parameters())) + 1 or arch == 'unet'
    for kind, (loss, grads, after) in zip(('one pass', 'two_pass=True'), results[1:]):
        assert abs(loss - loss_ref) <= tol * abs(loss_ref), (kind, loss, loss_ref)
        assert grads.keys() == grads_ref.keys(), kind
        for name, g in grads.items():
            ref = grads_ref[name]
            assert (g - ref).norm() <= tol * ref.norm(), (kind, name, rel(g, ref))
        assert after == after_ref, kind                         # the RNG advanced as far: one dropout draw


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while fn runs (a tensor without a storage of its
    own, such as a tangent inside a torch.func transform: its size)."""
    seen = {}

    def pack(x):
        try:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(x)] = x.numel() * x.element_size()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize('arch', list(NETS))
def test_one_pass_records_no_tangent(arch):
    """Under a grad-enabled torch.func.jvp the tangent has no grad_fn, and autograd saves exactly what a plain
    forward saves: no tangent is kept for a backward that never needs it. A stock layer (nn.SiLU) breaks both."""
    make, shape = NETS[arch]
    net = make(dropout=0.3).train()
    u, t = torch.randn(shape), torch.rand(shape[0]) + 0.1
    tangents = (torch.randn_like(u), torch.ones_like(t))
    torch.manual_seed(0)
    plain, F_plain = _saved_bytes(lambda: net(u, t))
    torch.manual_seed(0)
    one_pass, (F_theta, dF) = _saved_bytes(lambda: torch.func.jvp(lambda u, t: net(u, t), (u, t), tangents))
    assert F_theta.grad_fn is not None and dF.grad_fn is None and not dF.requires_grad
    assert one_pass == plain, (one_pass, plain)
    assert (F_theta - F_plain).abs().max() == 0
    # one stock op (PyTorch's SiLU) on the output: its tangent rule is recorded, and more is saved than in a forward
    stock = lambda u, t: torch.nn.functional.silu(net(u, t))
    torch.manual_seed(0)
    plain, _ = _saved_bytes(lambda: stock(u, t))
    torch.manual_seed(0)
    recorded, (_, dF) = _saved_bytes(lambda: torch.func.jvp(stock, (u, t), tangents))
    assert dF.grad_fn is not None and recorded > plain, (recorded, plain)


def test_primitives_tangents_and_gradients_match_finite_differences():
    """Every primitive with a hand-written tangent: gradcheck in fp64 checks its backward and its tangent (forward
    AD) against finite differences, for each input alone and all together; and its tangent equals PyTorch's own."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    gn = torch.nn.GroupNorm(2, 4, eps=1e-5).double()
    torch.nn.init.normal_(gn.weight), torch.nn.init.normal_(gn.bias)
    cases = [   # (primitive, inputs, PyTorch's own op for the same value)
        (model.silu, (torch.randn(3, 5, **d),), torch.nn.functional.silu),
        (model.gelu, (torch.randn(3, 5, **d),), lambda x: torch.nn.functional.gelu(x, approximate='tanh')),
        (model.mul, (torch.randn(3, 5, **d), torch.randn(1, 5, **d)), torch.mul),
        (lambda x: model.normalize(x), (torch.randn(3, 4, 2, **d),),
         lambda x: x / (1e-4 + x.flatten(1).norm(dim=1).reshape(-1, 1, 1) / math.sqrt(8))),
        (lambda x: model.normalize(x, dim=1), (torch.randn(3, 4, 2, 2, **d),),
         lambda x: x / (1e-4 + x.norm(dim=1, keepdim=True) / 2)),
        (model.pnorm, (torch.randn(3, 6, **d),), lambda v: v / (v.square().mean(1, keepdim=True) + 1e-8).sqrt()),
        (model.layer_norm, (torch.randn(2, 3, 8, **d),), lambda x: torch.nn.functional.layer_norm(x, (8,), eps=1e-6)),
        (lambda x: model.group_norm(x, gn), (torch.randn(2, 4, 3, 3, **d),), gn),
        (model.attention, tuple(torch.randn(2, 2, 5, 4, **d) for _ in range(3)),
         lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v),
        (lambda x, w, b: model.affine(x, w, b), (torch.randn(2, 3, 5, 5, **d), torch.randn(4, 3, 3, 3, **d),
                                               torch.randn(4, **d)),
         lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1)),
    ]
    for op, xs, ref in cases:
        xs = [x.requires_grad_() for x in xs]
        assert (op(*xs) - ref(*xs)).abs().max() < 1e-10, op
        assert torch.autograd.gradcheck(op, xs, check_forward_ad=True), op
        for i in range(len(xs)):                                # a tangent on one input only
            part = lambda x, i=i: op(*xs[:i], x, *xs[i + 1:])
            assert torch.autograd.gradcheck(part, (xs[i],), check_forward_ad=True), (op, i)
        tangents = tuple(torch.randn_like(x) for x in xs)
        _, y_t = torch.func.jvp(op, tuple(x.detach() for x in xs), tangents)
        _, y_t_ref = torch.func.jvp(ref, tuple(x.detach() for x in xs), tangents)
        assert rel(y_t, y_t_ref) < 1e-10, op
    # dropout: its tangent is the mask's product, drawn as nnf.dropout draws it
    x = torch.randn(4, 8, **d)
    torch.manual_seed(3)
    y, y_t = torch.func.jvp(lambda x: model.dropout(x, 0.5, True), (x,), (torch.ones_like(x),))
    torch.manual_seed(3)
    assert (y - torch.nn.functional.dropout(x, 0.5, True)).abs().max() < 1e-12 and (y == x * y_t).all()


def _shared_path_cases():
    """Primitives whose inputs share a path through the outer graph, each with its plain-torch twin: (h + 1) * h,
    (a + b) * b from one chunk, SwiGLU silu(a) * b, and attention with q, k, v from one unbind and v + k as values."""
    lin = lambda x, w: model.affine(x, w)                                         # noqa: E731
    att = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v  # noqa: E731
    return {
        'mul(h + 1, h)': (lambda h: model.mul(h + 1, h), lambda h: (h + 1) * h),
        'mul(a + b, b)': (lambda h: (lambda a, b: model.mul(a + b, b))(*h.chunk(2, 1)),
                          lambda h: (lambda a, b: (a + b) * b)(*h.chunk(2, 1))),
        'swiglu': (lambda h: (lambda a, b: model.mul(model.silu(a), b))(*h.chunk(2, 1)),
                   lambda h: (lambda a, b: torch.nn.functional.silu(a) * b)(*h.chunk(2, 1))),
        'attention(q, k, v + k)': (
            lambda h: model.attention(*(lambda q, k, v: (q, k, v + k))(*h.reshape(1, 1, 4, 3, 2).unbind(3))),
            lambda h: att(*(lambda q, k, v: (q, k, v + k))(*h.reshape(1, 1, 4, 3, 2).unbind(3)))),
    }, lin


@pytest.mark.parametrize('case', list(_shared_path_cases()[0]))
def test_one_pass_gradient_when_inputs_share_a_path(case):
    """Under a grad-enabled torch.func.jvp (the one-pass step), a primitive whose inputs reach each other through the
    outer graph: the gradient of the primal equals the plain forward's (the two-pass reference) to fp64 rounding and
    the tangent equals torch.func.jvp's of the plain ops. Before the fix (_NoGradTangent on the inputs' own edges) the
    first two were off by 18 and 17 (gradients peaking at 32 and 40), SwiGLU raised TypeError, attention was off by
    4.8."""
    cases, lin = _shared_path_cases()
    ours, plain = cases[case]
    d = dict(dtype=torch.float64)
    torch.manual_seed(0)
    x, x_t, w = torch.randn(4, 6, **d), torch.randn(4, 6, **d), torch.randn(6, 6, **d, requires_grad=True)
    y, y_t = torch.func.jvp(lambda x: ours(lin(x, w)), (x,), (x_t,))
    c = torch.randn_like(y)
    g, = torch.autograd.grad((y * c).sum(), w)
    y_ref = plain(x @ w.t())
    g_ref, = torch.autograd.grad((y_ref * c).sum(), w)
    with torch.no_grad():
        _, y_t_ref = torch.func.jvp(lambda x: plain(x @ w.t()), (x,), (x_t,))
    assert rel(y, y_ref) < 1e-12 and rel(g, g_ref) < 1e-12 and rel(y_t, y_t_ref) < 1e-12, (rel(g, g_ref),)


class _Sample(torch.nn.Module):
    """diffusers' UNet2DModel, unedited, called as (u, t, labels) -> its .sample."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, u, t, labels=None):
        return self.net(u, t).sample


def _stock_nets():
    """Networks of stock layers, unedited: bench.StockDiT (nn.Linear, nn.LayerNorm, SDPA, ...), and diffusers'
    UNet2DModel where diffusers is installed (as in CI)."""
    import bench
    nets = {'StockDiT': lambda: bench.StockDiT(img_resolution=8, img_channels=2, label_dim=4, hidden=32, depth=2,
                                               heads=2)}
    try:
        import diffusers
        nets['diffusers UNet2DModel'] = lambda: _Sample(diffusers.UNet2DModel(
            sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
            norm_num_groups=8, attention_head_dim=8))
    except ImportError:
        pass
    return nets


@pytest.mark.parametrize('name', ['StockDiT', 'diffusers UNet2DModel'])
def test_stock_networks_get_the_one_pass_step_unedited(name):
    """onepass.OnePass on a network of stock layers (fp64): the primal equals a plain forward bitwise, the tangent
    equals central finite differences, scm_loss's gradient through trigflow.JVP(net, mode=OnePass) equals the
    two-pass step's, and autograd saves exactly what a plain forward saves (audit: ratio 1, nothing extra). Without
    the mode, the audit names the ops that record their tangent."""
    import onepass
    from torch.nn.attention import SDPBackend, sdpa_kernel
    nets = _stock_nets()
    if name not in nets:
        pytest.skip('diffusers is not installed (README: the test install adds it)')
    torch.manual_seed(0)
    net = nets[name]().double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    u, t, y = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1, \
        torch.tensor([1, -1, 3])
    tangents = (torch.randn_like(u), torch.rand(3, dtype=torch.float64))
    F = lambda u, t: net(u, t, y)                                                                 # noqa: E731
    with onepass.OnePass():
        F_theta, dF = torch.func.jvp(F, (u, t), tangents)
    with torch.no_grad():                     # the tangent against central differences (PyTorch's own forward AD
        h = 1e-5                              # fails inside diffusers' group_norm on a non-contiguous tangent)
        dF_ref = (F(u + h * tangents[0], t + h * tangents[1]) - F(u - h * tangents[0], t - h * tangents[1])) / (2 * h)
    tol = 1e-8 if name == 'StockDiT' else 1e-3           # diffusers computes its time embedding in fp32
    assert torch.equal(F_theta, F(u, t)) and dF.grad_fn is None and rel(dF, dF_ref) < tol, rel(dF, dF_ref)
    jvp = tf.JVP(net, mode=onepass.OnePass)
    x_t, dxdt = u * 0.5, torch.randn_like(u)
    grads = []
    for two_pass in (False, True):     # the two-pass reference: the tangent without grad, then a plain forward
        net.zero_grad(set_to_none=True)
        tf.scm_loss(F, x_t, t, dxdt, two_pass=two_pass, jvp=lambda u, t, tg: jvp(u, t, y, tangents=tg))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert rel(grads[0], grads[1]) < 1e-12
    report = onepass.audit(F, (u, t), tangents)
    assert report['ratio'] == 1.0 and report['extra'] == {}, report
    if name == 'StockDiT':            # without the mode: PyTorch's rules, recorded (on diffusers' U-Net they fail,
        recorded = onepass.audit(F, (u, t), tangents, mode=lambda: sdpa_kernel([SDPBackend.MATH]))   # group_norm)
        assert recorded['ratio'] > 1.5 and 'linear' in recorded['extra'], recorded
    else:
        with pytest.raises(RuntimeError, match='view size is not compatible'), sdpa_kernel([SDPBackend.MATH]):
            torch.func.jvp(F, (u, t), tangents)


def test_attention_tangent_in_blocks_bounded_memory(tmp_path):
    """App. F's attention tangent computed a block of query rows at a time equals the explicit form to fp32 rounding,
    and at L = 4096 tokens its transient peak is at most 1/8 of the explicit form's (a fresh process's resident-set
    high-water mark, reset just before the call, above its resident set then; glibc returning freed blocks at once;
    measured here: 26 MB against 263 MB)."""
    import onepass
    torch.manual_seed(0)
    xs = tuple(torch.randn(2, 2, 700, 16) for _ in range(3))
    ts = tuple(torch.randn_like(x) for x in xs)
    y = torch.nn.functional.scaled_dot_product_attention(*xs)
    blocked = onepass._attention_tangent(xs, ts, y, block=64)
    explicit = onepass._attention_tangent(xs, ts, y, block=10 ** 9)
    assert rel(blocked, explicit) < 1e-6
    code = (f'import sys, torch; sys.path.insert(0, {ROOT!r}); import onepass; torch.manual_seed(0)\n'
            'kb = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))\n'
            'xs = tuple(torch.randn(1, 1, 4096, 64) for _ in range(3)); ts = tuple(torch.randn_like(x) for x in xs)\n'
            'y = torch.randn(1, 1, 4096, 64); w = tuple(x[..., :64, :] for x in xs)\n'
            'onepass._attention_tangent(w, w, w[0], block=64)\n'                          # warm-up: 64 tokens
            'open("/proc/self/clear_refs", "w").write("5"); before = kb("VmRSS")\n'     # reset the high-water mark
            'onepass._attention_tangent(xs, ts, y, block=int(sys.argv[1]))\n'
            'print(kb("VmHWM") - before)')
    env = dict(os.environ, OMP_NUM_THREADS='1', MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    peak = {b: int(subprocess.run([sys.executable, '-c', code, str(b)], env=env, capture_output=True, text=True,
                                  check=True).stdout) for b in (onepass.ATTENTION_BLOCK, 4096)}
    print('attention tangent peak above state, KB (blocked, explicit):', peak)
    assert peak[onepass.ATTENTION_BLOCK] * 8 <= peak[4096], peak


# ---------------------------------------------------------------------------------------------------------------
# On a GPU (skipped without CUDA; gpu_check.sh runs them with test_low_precision_autocast_jvp[...cuda]):
# the attention paths, NCCL.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (run gpu_check.sh on a GPU machine)')


@cuda
def test_cuda_attention_fused_also_under_jvp(monkeypatch):
    """Fused SDPA (flash/memory-efficient kernels) for attention's value and backward, with or without a tangent;
    under the JVP the tangent is App. F's formula, which agrees with PyTorch's JVP of the math path."""
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(model.nnf, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or fused(*a, **k))
    net = tiny_unet().cuda()
    u, t = torch.randn(2, 1, 16, 16, device='cuda'), torch.rand(2, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        plain = net(u, t)
        n_plain = len(calls)
        via_jvp, _ = torch.func.jvp(lambda u: net(u, t), (u,), (torch.randn_like(u),))
    assert n_plain > 0 and len(calls) == 2 * n_plain                           # fused under the JVP too
    assert (plain.float() - via_jvp.float()).abs().max() < 0.05
    q, k, v = (torch.randn(2, 2, 64, 16, device='cuda') for _ in range(3))
    tangents = tuple(torch.randn_like(q) for _ in range(3))
    _, y_t = torch.func.jvp(model.attention, (q, k, v), tangents)
    _, y_t_math = torch.func.jvp(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v, (q, k, v), tangents)
    assert rel(y_t, y_t_math) < 1e-4


@cuda
def test_cuda_torchrun_one_process_on_nccl(image_folder, tiny_teacher, tmp_path):
    p = run_script('train_scd.py', '--preset', 'fashion-s', '--data', image_folder, *TINY, '--teacher', tiny_teacher,
                   '--s-max', 1, '--out', tmp_path / 'run', '--steps', 3, '--precision', 'bf16', torchrun=True)
    assert 'on cuda:0' in p.stdout and 'weights sha256' in p.stdout, p.stdout[-2000:]     # DDP over NCCL, 1 rank


# ---------------------------------------------------------------------------------------------------------------
# Samplers


def test_consistency_sampling_recovers_the_gaussian():
    """1-step from t_max and 2-step through t = 1.1 with the exact consistency function give N(mu, s^2)."""
    mu, s = gauss_params()
    F = F_consistency(mu, s)
    torch.manual_seed(0)
    z = torch.randn(200000, 6, dtype=torch.float64) * SD
    for ts in [(tf.T_MAX,), (tf.T_MAX, tf.T_MID)]:
        x = tf.sample_consistency(F, z, ts)
        assert (x.mean(0) - mu).abs().max() < 0.01, ts
        assert (x.std(0) / s - 1).abs().max() < 0.01, ts


def test_heun_converges_to_exact_ode_solution():
    """EDM Heun with the exact Gaussian velocity converges to the exact ODE solution f*(z, t_max) (2nd order)."""
    mu, s = gauss_params()
    F = F_teacher(mu, s)
    torch.manual_seed(0)
    z = torch.randn(256, 6, dtype=torch.float64) * SD
    exact = gauss_f(z, torch.full((256,), tf.T_MAX, dtype=torch.float64), mu, s)
    errs = [(tf.sample_heun(F, z, n) - exact).abs().max().item() for n in (4, 8, 16, 32, 64)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-2 and errs[-2] / errs[-1] > 3.5, errs                    # ~4x per doubling
    # 18 steps = 35 network evaluations
    calls = []
    tf.sample_heun(lambda u, t: calls.append(1) or F(u, t), z[:2], 18)
    assert len(calls) == 35


def test_samplers_in_fp32_keep_their_times_in_double_precision():
    """t_max = arctan(80 / sd) = 1.5645 rounds in fp32 by up to 6e-8, which moves cos t by 1e-5 of itself; the samplers
    take t and its trig factors in double precision, so an fp32 sample equals the fp64 one to fp32 rounding (the
    Gaussian teacher and consistency function, evaluated in the sample's own precision)."""
    mu, s = gauss_params()
    torch.manual_seed(0)
    z = torch.randn(256, 6, dtype=torch.float64) * SD
    eps = torch.randn(256, 6, dtype=torch.float64)
    for F, sample in ((F_teacher, lambda F, z: tf.sample_heun(F, z, 18)),
                      (F_consistency, lambda F, z: tf.sample_consistency(F, z)),
                      (F_consistency, lambda F, z: tf.sample_consistency(F, z, (tf.T_MAX, tf.T_MID),
                                                                         randn_like=lambda x: eps.to(x.dtype)))):
        x32, x64 = (sample(F(mu.to(d), s.to(d)), z.to(d)) for d in (torch.float32, torch.float64))
        assert ((x32.double() - x64).abs().max() / x64.abs().max()).item() < 1e-6    # fp32 t: Heun 7.5e-6


# ---------------------------------------------------------------------------------------------------------------
# Training scripts: short runs on a tiny synthetic image folder (no download), resume, DDP, bad inputs.

import json  # noqa: E402
import shutil  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ['--model', 'tiny', '--batch', '8', '--log-every', '2', '--ckpt-every', '3', '--sample-every', '0',
        '--lr-rampup-mimg', '0', '--warmup-steps', '4']


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    from PIL import Image
    folder = tmp_path_factory.mktemp('images')
    g = torch.Generator().manual_seed(0)
    for i in range(32):
        img = (torch.rand(16, 16, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img, mode='L').save(folder / f'{i:03d}.png')
    return str(folder)


def run_script(script, *args, nproc=1, check=True, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 or torchrun else [sys.executable]
    p = subprocess.run(cmd + [os.path.join(ROOT, script), *map(str, args)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f'{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def method_args(script, teacher):
    if script == 'train_teacher.py':
        return ['--label-dropout', '0']
    return ['--teacher', teacher] + (['--s-max', '1'] if script == 'train_scd.py' else [])


@pytest.fixture(scope='module')
def tiny_teacher(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher') / 'run'
    run_script('train_teacher.py', '--preset', 'fashion-s', '--data', image_folder, '--out', out, '--steps', 6,
               *TINY[:-2], '--label-dropout', '0')
    return str(out / 'checkpoint.pt')


def _ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('spec', ['train_teacher.py', 'train_scd.py', 'train_sct.py', 'train_scd.py --vsd 1',
                                  'train_sct.py --recipe ct2023 --K 6', 'train_scd.py --recipe cd2023'])
def test_resume_is_bit_exact(spec, image_folder, tiny_teacher, tmp_path):
    """6 steps in one go == 3 steps, stop, resume to 6 (same weights, EMA, optimizer state, bit for bit; with
    sCD + aVSD also F_phi and the two adaptive weights; with CT 2023 its EMA target theta-)."""
    script, *more = spec.split()
    extra = [a for a in TINY if script != 'train_teacher.py' or a not in ('--warmup-steps', '4')]
    common = ['--preset', 'fashion-s', '--data', image_folder, *extra, *method_args(script, tiny_teacher),
              '--dropout', '0.2', *more]
    run_script(script, *common, '--out', tmp_path / 'a', '--steps', 6)
    run_script(script, *common, '--out', tmp_path / 'b', '--steps', 3)
    run_script(script, *common, '--out', tmp_path / 'b', '--steps', 6, '--resume')
    a, b = _ckpt(tmp_path / 'a' / 'checkpoint.pt'), _ckpt(tmp_path / 'b' / 'checkpoint.pt')
    assert a['step'] == b['step'] == 6
    assert ('fake' in a) == ('--vsd' in spec) and ('target' in a) == ('ct2023' in spec)
    if 'target' in a:          # theta- moved from the start (the teacher's EMA) and lags theta: an EMA of it
        start = _ckpt(tiny_teacher)['ema']
        assert any(not torch.equal(a['target'][k], v) for k, v in start.items())
        assert any(not torch.equal(a['target'][k], a['net'][k]) for k in start)
    for key in ('net', 'ema', 'wnet') + tuple(k for k in ('fake', 'wvsd', 'wfake', 'target') if k in a):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    log_a = {r['step']: r for r in map(json.loads, open(tmp_path / 'a' / 'log.jsonl'))}
    log_b = {r['step']: r for r in map(json.loads, open(tmp_path / 'b' / 'log.jsonl'))}
    assert sorted(log_a) == [2, 4, 6] and sorted(log_b) == [2, 3, 4, 6]
    for k in (2, 4, 6):   # step 4 averages steps 3 (before the resume) and 4, as in the uninterrupted run
        assert log_a[k]['loss'] == log_b[k]['loss'] and log_a[k]['grad_norm'] == log_b[k]['grad_norm'], k


@pytest.mark.parametrize('spec', ['train_teacher.py', 'train_scd.py', 'train_sct.py', 'train_scd.py --vsd 1',
                                  'train_sct.py --recipe ict'])
def test_ddp_two_ranks_stay_identical(spec, image_folder, tiny_teacher, tmp_path):
    """Under DDP the ranks' weights stay identical (sCD + aVSD: the student's 1-step samples run the module outside
    DDP's wrapper, and their gradient still joins the one all-reduce)."""
    script, *more = spec.split()
    extra = [a for a in TINY if script != 'train_teacher.py' or a not in ('--warmup-steps', '4')] + more
    p = run_script(script, '--preset', 'fashion-s', '--data', image_folder, *extra, *method_args(script, tiny_teacher),
                   '--out', tmp_path / 'ddp', '--steps', 4, '--dropout', '0.2', nproc=2)
    assert 'identical: True' in p.stdout, p.stdout
    # gradient accumulation: 2 ranks x 2 micro-batches of 2 == the same global batch of 8
    p = run_script(script, '--preset', 'fashion-s', '--data', image_folder, *extra, *method_args(script, tiny_teacher),
                   '--out', tmp_path / 'accum', '--steps', 2, '--batch-gpu', 2, nproc=2)
    assert 'identical: True' in p.stdout, p.stdout


DDP_GRADIENTS = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import cli, model, trigflow as tf
from torch.nn.parallel import DistributedDataParallel as DDP
cuda = sys.argv[2] == 'nccl'
dist.init_process_group(sys.argv[2])
rank, dev = dist.get_rank(), torch.device('cuda', dist.get_rank()) if cuda else torch.device('cpu')
dtype = torch.float32 if cuda else torch.float64
torch.manual_seed(0)
mode = None
if sys.argv[3] == 'stock':                         # a DiT of stock layers, one-pass through onepass.OnePass
    import bench, onepass
    net, mode = bench.StockDiT(img_resolution=16, img_channels=1, label_dim=0, hidden=32, depth=2, heads=2), onepass.OnePass
    net = net.to(dev, dtype).train()
else:
    net = model.UNet(**dict(model.UNET_PRESETS['tiny'], dropout=0.3)).to(dev, dtype).train()
ddp = DDP(tf.JVP(net, mode=mode))
local_jvp = tf.JVP(net, mode=mode)
torch.manual_seed(100 + rank)                                       # each rank its own batch and dropout mask
x_t, dxdt = torch.randn(3, 1, 16, 16, device=dev, dtype=dtype) * 0.5, torch.randn(3, 1, 16, 16, device=dev, dtype=dtype)
t = torch.tensor([0.2, 0.9, 1.4], device=dev, dtype=dtype)
flat = lambda: torch.cat([p.grad.flatten() for p in net.parameters()])
out = []
for two_pass in (False, True):
    rng = torch.get_rng_state()
    net.zero_grad(set_to_none=True)
    tf.scm_loss(lambda u, t: ddp(u, t), x_t, t, dxdt, two_pass=two_pass,
                jvp=lambda u, t, tangents: ddp(u, t, tangents=tangents))[0].backward()     # all-reduced
    synced = flat()
    torch.set_rng_state(rng)
    net.zero_grad(set_to_none=True)
    tf.scm_loss(net, x_t, t, dxdt, two_pass=two_pass,
                jvp=lambda u, t, tangents: local_jvp(u, t, tangents=tangents))[0].backward()  # this rank's own
    local = flat()
    every = [torch.empty_like(synced) for _ in range(2)]
    dist.all_gather(every, synced)
    mean = local.clone()
    dist.all_reduce(mean)
    mean /= 2
    out.append((torch.equal(every[0], every[1]), ((synced - mean).norm() / mean.norm()).item(),
                ((local - mean).norm() / mean.norm()).item()))
if rank == 0:
    for (same, err, spread), name in zip(out, ('one pass', 'two_pass')):
        print(f'{name}: identical {same} err {err:.3g} spread {spread:.3g}')
dist.barrier()
dist.destroy_process_group()
cli._leave(0)                      # as the scripts leave: a gloo thread may outlive the group (cli._leave says why)
"""


@pytest.mark.parametrize('net', ['unet', 'stock'])
@pytest.mark.parametrize('backend', ['gloo', pytest.param('nccl', marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason='needs 2 GPUs (gloo on CPU runs everywhere)'))])
def test_ddp_gradients_of_the_one_pass_are_the_mean_of_the_ranks(backend, net, tmp_path):
    """2 ranks, DDP(trigflow.JVP(net)) (net: the U-Net, or a DiT of stock layers under onepass.OnePass), each rank its
    own batch and dropout mask: after the one-pass (and the two-pass) scm_loss's backward, the gradients are identical on both ranks and equal the mean of the gradients each
    rank computes alone, without DDP (and those differ, so the all-reduce did something)."""
    script = tmp_path / 'ddp_gradients.py'
    script.write_text(DDP_GRADIENTS)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(script), ROOT, backend, net], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    tol = 1e-12 if backend == 'gloo' else 1e-5
    for name in ('one pass', 'two_pass'):
        m = re.search(rf'^{name}: identical (\w+) err (\S+) spread (\S+)$', p.stdout, re.M)
        assert m and m[1] == 'True' and float(m[2]) < tol and float(m[3]) > 1e-3, p.stdout


def test_a_gpu_precision_on_a_cpu_says_so(image_folder, tmp_path):
    p = run_script('train_teacher.py', '--preset', 'fashion-s', '--data', image_folder, *TINY[:-2], '--steps', 1,
                   '--precision', 'bf16', '--out', tmp_path / 'run')
    assert 'note: --precision bf16 on a CPU is emulated' in p.stderr, p.stderr[-2000:]


def test_backward_runs_outside_autocast():
    """In each training loop autocast covers the forward and the loss, and the one backward() sits outside it
    (PyTorch's AMP guidance); DDP's no_sync still covers the backward. Read from the scripts' syntax tree."""
    import ast
    for script in ('train_teacher.py', 'train_scd.py', 'train_sct.py'):
        found = []

        def visit(node, autocast, no_sync):
            if isinstance(node, ast.With):
                names = [ast.unparse(item.context_expr) for item in node.items]
                autocast = autocast or any('autocast' in n for n in names)
                no_sync = no_sync or any('no_sync' in n for n in names)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'backward':
                found.append((node.lineno, autocast, no_sync))
            for child in ast.iter_child_nodes(node):
                visit(child, autocast, no_sync)
        visit(ast.parse(open(os.path.join(ROOT, script)).read()), False, False)
        assert [(a, n) for _, a, n in found] == [(False, True)], (script, found)


def test_collectives_are_never_under_rank_0():
    """Every call all ranks must make (named *_all_ranks, or a dist. collective) sits outside any `if rank == 0`
    block in each training loop, so that a rank cannot wait forever for one that skipped it."""
    import ast
    for script in ('train_teacher.py', 'train_scd.py', 'train_sct.py'):
        found = []

        def visit(node, rank0):
            if isinstance(node, ast.If):
                rank0 = rank0 or 'rank == 0' in ast.unparse(node.test)
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name.endswith('_all_ranks') or name.startswith('dist.') and name not in (
                        'dist.is_initialized', 'dist.get_rank', 'dist.get_world_size', 'dist.init_process_group'):
                    found.append((name, rank0))
            for child in ast.iter_child_nodes(node):
                visit(child, rank0)
        visit(ast.parse(open(os.path.join(ROOT, script)).read()), False)
        names = {n for n, _ in found}
        assert {'tu.load_data_all_ranks', 'tu.check_step_all_ranks', 'rf.log_record_all_ranks',
                'rf.run_state_all_ranks', 'tu.report_weights_all_ranks'} <= names, (script, names)
        assert not [n for n, r in found if r], (script, found)


def test_sampling_tools_import_no_training_helper():
    """sample.py, fid.py and edit.py load nothing named train_* (directly or through what they import): reading a
    checkpoint and the per-step seed live in checkpoint.py, which imports no training helper."""
    import ast
    mods = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py') and not f.startswith('test_')}
    deps = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(ROOT, m + '.py')).read())
        deps[m] = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    for tool in ('sample', 'fid', 'edit', 'checkpoint'):
        seen, todo = set(), [tool]
        while todo:
            for d in deps[todo.pop()] & mods - seen:
                seen.add(d)
                todo.append(d)
        assert not [m for m in seen if m.startswith('train_') or m == 'run_folder'], (tool, sorted(seen))


METHOD_FLAGS = {'vsd', 'recipe', 'discrete', 'target', 'two_pass', 'grid', 'mu', 'fake', 'init', 'method', 'teacher',
                'student', 'guide', 'guide_net'}


def loop_ifs(source):
    """(ifs, method ifs) in the training loop of main() (its outermost while/for): every `if` statement and
    conditional expression, and those whose test reads a name or attribute in METHOD_FLAGS."""
    import ast
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == 'main')
    loop = next(n for n in ast.walk(main) if isinstance(n, (ast.While, ast.For)))
    ifs = [n for n in ast.walk(loop) if isinstance(n, (ast.If, ast.IfExp))]
    reads = lambda e: {n.id for n in ast.walk(e) if isinstance(n, ast.Name)} | {                 # noqa: E731
        n.attr for n in ast.walk(e) if isinstance(n, ast.Attribute)}
    return len(ifs), sum(1 for n in ifs if reads(n.test) & METHOD_FLAGS)


@pytest.mark.parametrize('script', ['train_teacher.py', 'train_sct.py', 'train_scd.py'])
def test_the_loop_never_asks_which_method_it_runs(script):
    """Each training script builds its loss before the loop (build_loss / loss_fn): the loop holds at most one `if`
    whose test reads a method flag (a recipe's target EMA update), as EDM2's training loop holds none."""
    ifs, method = loop_ifs(open(os.path.join(ROOT, script)).read())
    assert method <= 1, (script, ifs, method)


def test_no_file_imports_one_that_imports_it_back():
    """The project's modules import each other one way only (a function-level import counts too): no cycles."""
    import ast
    mods = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py') and not f.startswith('test_')}
    graph = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, m + '.py')).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.add(node.module.split('.')[0])
        graph[m] = deps & mods - {m}
    assert graph['sample'] >= {'latents'} and 'sample' in graph['edit'] and 'sample' in graph['fid']   # it reads them
    state = {}

    def cycle_from(m, path):
        state[m] = 'open'
        for d in sorted(graph[m]):
            if state.get(d) == 'open':
                return path + [m, d]
            if d not in state and (c := cycle_from(d, path + [m])):
                return c
        state[m] = 'done'
        return None
    for m in sorted(mods):
        if m not in state:
            cycle = cycle_from(m, [])
            assert cycle is None, ' -> '.join(cycle)

def test_bad_inputs_get_one_clear_line(image_folder, tiny_teacher, tmp_path):
    def fails(script, *args, match):
        p = run_script(script, *args, check=False)
        assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith('error:') and match in last, last
        return last

    base = ['--preset', 'fashion-s', '--steps', 2, *TINY[:-2]]
    fails('train_teacher.py', *base, '--data', tmp_path / 'nope', '--out', tmp_path / 'x', match='nope')
    fails('train_teacher.py', *base, '--data', image_folder, '--model', 'fashion-s', '--out', tmp_path / 'x',
          match='16x16')                                                     # 16x16x1 images, a 28x28 model
    fails('train_scd.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--s-max', 1, match='--teacher')
    fails('train_scd.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--s-max', 1, '--teacher',
          tiny_teacher, '--vsd', 1, '--discrete', 64, match='--vsd adds to sCD in continuous time')
    fails('train_scd.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--s-max', 1, '--teacher',
          tiny_teacher, '--vsd', 1, '--student', tmp_path / 'none.pt', match='none.pt')
    # the discrete-time recipes' flags without a recipe, and a recipe with sCM-only flags or a bad value
    fails('train_sct.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--teacher', tiny_teacher,
          '--metric', 'l2', match='--metric belong to the discrete-time recipes')
    fails('train_sct.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--teacher', tiny_teacher,
          '--recipe', 'ict', '--discrete', 64, match="--discrete is for sCM's loss, not --recipe ict")
    fails('train_sct.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--teacher', tiny_teacher,
          '--recipe', 'ct2023', '--mu0', 1, match='--mu0 must be in [0, 1)')
    fails('train_scd.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--teacher', tiny_teacher,
          '--recipe', 'cd2023', '--N', 1, match='needs --N of 2 or more')
    last = fails('train_scd.py', '--size', 'xl', match='needs --data (')          # the card's command, bare:
    assert 'latents.py encode' in last and '--teacher (' in last                   # every missing flag at once
    fails('train_sct.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--teacher', tmp_path / 'no.pt',
          match='no checkpoint')
    # an unreadable image inside a folder (decoded lazily, so it fails in the loop), and a too-small dataset
    broken = tmp_path / 'broken'
    shutil.copytree(image_folder, broken)
    for f in sorted(os.listdir(broken))[8:]:
        os.remove(broken / f)
    (broken / 'zz.png').write_text('not an image')
    fails('train_teacher.py', *base, '--data', broken, '--batch', 9, '--out', tmp_path / 'x1', match='zz.png')
    fails('train_teacher.py', *base, '--data', broken, '--batch', 18, '--out', tmp_path / 'x2', match='fewer than')
    for flag, value in [('--batch', -16), ('--batch', 0), ('--ckpt-every', 0), ('--log-every', 0), ('--lr', -1),
                        ('--workers', -1), ('--batch-gpu', 0)]:
        fails('train_teacher.py', *base, '--data', image_folder, flag, value, '--out', tmp_path / 'x3', match=flag)
    fails('train_teacher.py', *base, '--data', image_folder, '--out', image_folder + '/000.png', match='is a file')
    # a teacher of another architecture
    fails('train_sct.py', *base, '--data', image_folder, '--out', tmp_path / 'x', '--teacher', tiny_teacher,
          '--model', 'DiT-tiny', match='another architecture')
    # an existing run is never overwritten, and a resume with another config is refused
    run_script('train_teacher.py', *base, '--data', image_folder, '--out', tmp_path / 'r', '--label-dropout', 0)
    before = open(tmp_path / 'r' / 'checkpoint.pt', 'rb').read()
    fails('train_teacher.py', *base, '--data', image_folder, '--out', tmp_path / 'r', match='--resume')
    fails('train_teacher.py', *base, '--data', image_folder, '--out', tmp_path / 'r', '--resume', '--lr', 0.5,
          '--label-dropout', 0, match='--lr=0.01 there vs 0.5 here')
    assert open(tmp_path / 'r' / 'checkpoint.pt', 'rb').read() == before


def test_recipes_print_their_published_values_under_help():
    """--help lists every recipe's values; with --recipe the flags show that recipe's value, over the preset's."""
    out = run_script('train_sct.py', '--help').stdout
    assert 'ict: grid=ict, s0=10, s1=1280, mu0=0.0, metric=pseudo-huber' in ' '.join(out.split())
    assert 'ct2023: grid=cm2023, s0=2, s1=150, mu0=0.9, metric=l2' in ' '.join(out.split())
    out = ' '.join(run_script('train_sct.py', '--preset', 'fashion-s', '--recipe', 'ict', '--help').stdout.split())
    assert '[ict: pseudo-huber]' in out and '[ict: -1.1]' in out and '[fashion-s: 128]' in out
    out = ' '.join(run_script('train_scd.py', '--preset', 'fashion-s', '--recipe', 'cd2023', '--help').stdout.split())
    assert 'cd2023: grid=fixed, N=18, mu0=0.0, metric=l2' in out and '[cd2023: 18]' in out


def test_nonfinite_loss_stops_and_names_the_term(tmp_path):
    """A NaN in the data reaches the loss: the run stops at that step (counted from 1, as the log counts), names the
    term and the data as the cause, exits 3. With --on-nonfinite skip it skips every step and still checkpoints."""
    lat = (torch.randn(16, 4, 8, 8) * torch.tensor(latents.LATENT_STD).view(4, 1, 1) +     # SD-VAE-like raw latents
           torch.tensor(latents.LATENT_MEAN).view(4, 1, 1)).numpy()
    lat[3, 0, 0, 0] = float('nan')
    np.save(tmp_path / 'lat.npy', lat)
    common = ['--preset', 'fashion-s', '--data', tmp_path / 'lat.npy', '--model', 'DiT-tiny', '--batch', 16,
              '--steps', 3, '--label-dropout', 0, '--sample-every', 0]
    p = run_script('train_teacher.py', *common, '--out', tmp_path / 'run', check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert 'step 1: non-finite loss' in last and 'training data holds NaN' in last, last
    p = run_script('train_teacher.py', *common, '--out', tmp_path / 'run2', '--on-nonfinite', 'skip', '--ckpt-every', 3)
    assert 'step 1: non-finite loss' in p.stdout and 'step skipped' in p.stdout, p.stdout[-2000:]
    assert _ckpt(tmp_path / 'run2' / 'checkpoint.pt')['step'] == 3          # the skipped last step still saves


@pytest.mark.parametrize('nproc', [1, 2])
def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(image_folder, tmp_path, nproc):
    """Preemption: SIGTERM (to the process, or to torchrun, which passes it on) ends the step on every rank, writes
    a checkpoint and exits (code 4); --resume then matches an uninterrupted run bit for bit."""
    import signal
    common = ['--preset', 'fashion-s', '--data', image_folder, *TINY[:-2], '--label-dropout', 0, '--dropout', 0.2]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.Popen(launch + [os.path.join(ROOT, 'train_teacher.py'), *map(str, common), '--steps', '5000',
                                      '--out', str(tmp_path / 'a')], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        if os.path.exists(tmp_path / 'a' / 'log.jsonl'):                  # inside the loop
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert err.count('interrupted: SIGTERM after step') == nproc, err[-2000:]
    if nproc == 1:
        assert proc.returncode == 4 and err.strip().splitlines()[-1].startswith('interrupted:'), err[-2000:]
    k = _ckpt(tmp_path / 'a' / 'checkpoint.pt')['step']
    assert 2 <= k < 5000 and f'after step {k};' in err
    run_script('train_teacher.py', *common, '--out', tmp_path / 'a', '--steps', k + 3, '--resume', nproc=nproc)
    run_script('train_teacher.py', *common, '--out', tmp_path / 'b', '--steps', k + 3, nproc=nproc)
    a, b = _ckpt(tmp_path / 'a' / 'checkpoint.pt'), _ckpt(tmp_path / 'b' / 'checkpoint.pt')
    for key in ('net', 'ema', 'wnet'):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key


def test_tf32_is_off_unless_asked(image_folder, tmp_path, monkeypatch):
    """EDM and EDM2 train with TF32 off: the 'fp32' presets then compute the JVP in full fp32 on Ampere and later."""
    import signal
    import train_teacher
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for extra, want in (([], False), (['--tf32'], True)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not want
            monkeypatch.setattr(sys, 'argv', ['train_teacher.py', '--preset', 'fashion-s', '--data', image_folder,
                                              *map(str, TINY[:-2]), '--label-dropout', '0', '--steps', '1',
                                              '--out', str(tmp_path / str(want)), *extra])
            train_teacher.main()
            assert torch.backends.cuda.matmul.allow_tf32 is want and torch.backends.cudnn.allow_tf32 is want
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True   # torch's defaults


def test_presets_keep_the_papers_shared_cm_values():
    """sCT and sCD each hold their presets beside their loop, with the CM values Tables 4-5 share written out in each
    file: both files give the same ones, and every ImageNet and CIFAR row of both carries them (CIFAR-10's own
    optimizer, precision and EMA aside)."""
    import train_scd
    import train_sct
    assert train_scd.CM == train_sct.CM
    shared = ('tangent_c', 'tangent_norm', 'warmup_steps', 'discrete', 'betas', 'lr_rampup_mimg')
    for presets in (train_scd.PRESETS, train_sct.PRESETS):
        for name, row in presets.items():
            if not name.startswith('fashion'):                   # sCD + aVSD continues a student: warmup done
                want = dict(train_scd.CM, warmup_steps=0) if name.endswith('-vsd') else train_scd.CM
                assert {k: row[k] for k in shared} == {k: want[k] for k in shared}, name
    assert train_scd.PRESETS['xl']['lr'] == 7.0e-5 and train_sct.PRESETS['xl']['steps'] == 100_000   # Table 5


def test_checkpoints_carry_their_presets_sampling_defaults():
    """ImageNet teachers sample with Heun, 32 steps (63 NFE) and Table 6's guidance; a guided sCD student with
    Table 6's guidance for 1 and 2 steps; sample.py takes them from the checkpoint unless told otherwise."""
    import argparse
    import run_folder
    import sample
    import train_scd
    import train_teacher
    assert run_folder.sampling_defaults(argparse.Namespace(**train_teacher.PRESETS['s'])) == dict(heun_steps=32, cfg=1.4)
    assert run_folder.sampling_defaults(argparse.Namespace(**train_teacher.PRESETS['xl']))['cfg'] == 1.2
    assert run_folder.sampling_defaults(argparse.Namespace(**train_scd.PRESETS['s']))['cfg'] == (1.5, 1.4)
    assert run_folder.sampling_defaults(argparse.Namespace(**train_teacher.PRESETS['fashion-s'])) == dict(
        heun_steps=18, cfg=1.0)
    p = argparse.ArgumentParser()
    sample.add_sampler_args(p)
    scd = dict(method='scd', model_kwargs=dict(label_dim=1000), sampling=dict(heun_steps=18, cfg=(1.5, 1.4)))
    teacher = dict(method='teacher', model_kwargs=dict(label_dim=1000), sampling=dict(heun_steps=32, cfg=1.4))
    for ckpt, flags, want in [(scd, [], (18, 1.5)), (scd, ['--steps', '2'], (18, 1.4)), (scd, ['--ts', '1.5', '1.1'],
                              (18, 1.4)), (scd, ['--cfg', '1.0'], (18, 1.0)), (teacher, [], (32, 1.4)),
                              (teacher, ['--heun-steps', '18', '--cfg', '2'], (18, 2.0)),
                              (dict(method='teacher', model_kwargs={}), [], (18, 1.0))]:          # an older checkpoint
        args = p.parse_args(flags)
        args.num = 1
        sample.check_args(args, ckpt)
        assert (args.heun_steps, args.cfg) == want, (flags, want)


def test_one_writer_per_run_and_no_litter(image_folder, tmp_path):
    """A run folder whose lock is held is refused; holding it, a run removes what killed writers left (temporary
    files, a log without a checkpoint), and a torn last log line does not stop a resume."""
    import fcntl
    base = ['--preset', 'fashion-s', '--data', image_folder, *TINY[:-2], '--label-dropout', 0]
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 1.0}\n')   # killed, no checkpoint
    with open(out / '.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = run_script('train_teacher.py', *base, '--steps', 2, '--out', out, check=False)
        assert p.returncode == 2 and 'in use by another process' in p.stderr.strip().splitlines()[-1], p.stderr
    run_script('train_teacher.py', *base, '--steps', 2, '--out', out)
    assert [json.loads(line)['step'] for line in open(out / 'log.jsonl')] == [2]
    (out / 'checkpoint.pt.tmp4242').write_bytes(b'half a checkpoint')
    (out / 'samples').mkdir(exist_ok=True)
    (out / 'samples' / 'x.png.tmp').write_bytes(b'half a png')
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"step": 3, "lo')                                                   # torn by a kill
    run_script('train_teacher.py', *base, '--steps', 4, '--out', out, '--resume')
    assert sorted(os.listdir(out)) == ['.lock', 'checkpoint.pt', 'config.json', 'log.jsonl', 'samples']
    assert os.listdir(out / 'samples') == []
    assert [json.loads(line)['step'] for line in open(out / 'log.jsonl')] == [2, 4]


def test_failed_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    import errno
    import checkpoint
    path = str(tmp_path / 'checkpoint.pt')
    checkpoint.save(path, {'step': 1})

    def full_disk(obj, f):
        with open(f, 'wb') as fh:
            fh.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(cli.UserError, match='disk is full.*previous checkpoint is intact'):
        checkpoint.save(path, {'step': 2})
    assert os.listdir(tmp_path) == ['checkpoint.pt'] and torch.load(path)['step'] == 1


def test_an_exported_checkpoint_samples_teaches_and_refuses_to_resume(image_folder, tiny_teacher, tmp_path):
    """checkpoint.py export keeps the EMA weights and what sampling reads: the same images from it as from the run's
    checkpoint, a student starts from an exported teacher, and --raw and --resume get one line each."""
    run_script('checkpoint.py', 'export', tiny_teacher, tmp_path / 't.pt')
    assert set(_ckpt(tmp_path / 't.pt')) == {'method', 'step', 'config', 'model_kwargs', 'data', 'sampling', 'ema'}
    assert os.path.getsize(tmp_path / 't.pt') < os.path.getsize(tiny_teacher) / 2
    for ckpt, npz in [(tiny_teacher, 'a.npz'), (tmp_path / 't.pt', 'b.npz')]:
        run_script('sample.py', ckpt, '-n', 4, '--heun-steps', 3, '--npz', tmp_path / npz)
    assert np.array_equal(np.load(tmp_path / 'a.npz')['samples'], np.load(tmp_path / 'b.npz')['samples'])
    run_script('train_scd.py', '--preset', 'fashion-s', '--data', image_folder, *TINY, '--teacher', tmp_path / 't.pt',
               '--s-max', 1, '--out', tmp_path / 'scd', '--steps', 1)
    p = run_script('sample.py', tmp_path / 't.pt', '--raw', '--grid', tmp_path / 'x.png', check=False)
    assert p.returncode == 2 and 'EMA weights only' in p.stderr.strip().splitlines()[-1]
    os.makedirs(tmp_path / 'r')
    shutil.copy(tmp_path / 't.pt', tmp_path / 'r' / 'checkpoint.pt')
    p = run_script('train_teacher.py', '--preset', 'fashion-s', '--data', image_folder, *TINY[:-2], '--steps', 2,
                   '--out', tmp_path / 'r', '--resume', check=False)
    assert p.returncode == 2 and 'not a run to resume' in p.stderr.strip().splitlines()[-1], p.stderr[-1000:]


def test_the_shipped_checkpoints_sample_as_the_readme_says(tmp_path):
    """checkpoints/: a fashion-s teacher and its sCD student, EMA weights only, each <= 2 MB; the README's command."""
    for name in ('teacher-fashion-s.pt', 'scd-fashion-s.pt'):
        path = os.path.join(ROOT, 'checkpoints', name)
        assert os.path.getsize(path) <= 2 * 2 ** 20 and 'opt' not in _ckpt(path)
    ckpt = _ckpt(os.path.join(ROOT, 'checkpoints', 'scd-fashion-s.pt'))
    import train_scd
    assert ckpt['method'] == 'scd' and ckpt['step'] >= train_scd.PRESETS['fashion-s']['steps']   # its preset's steps
    run_script('sample.py', 'checkpoints/scd-fashion-s.pt', '--steps', 2, '--grid', tmp_path / 'scd.png',
                   '--npz', tmp_path / 'scd.npz')
    x = np.load(tmp_path / 'scd.npz')['samples'].astype(np.float64) / 255
    assert x.shape == (64, 28, 28, 1) and 0.15 < x.mean() < 0.45 and x.std() > 0.2   # Fashion-MNIST: 0.29, 0.35


def _doc_table(path, heading):
    """The rows of the first Markdown table after `heading` in `path`, as {column header: cell} dicts."""
    lines = open(os.path.join(ROOT, path), encoding='utf-8').read().split('\n')
    i = next(k for k, line in enumerate(lines) if line.startswith(heading))
    i = next(k for k in range(i, len(lines)) if lines[k].startswith('|'))
    header = [c.strip() for c in lines[i].strip('|').split('|')]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith('|'):
            return rows
        rows.append(dict(zip(header, (c.strip().replace('*', '') for c in line.strip('|').split('|')))))
    return rows


def test_the_results_tables_are_the_committed_fid_file_digit_for_digit():
    """README's and REPRODUCTION's tables are figures/repro/fid.txt (written by reproduce.sh): every FID, seed-1 FID
    and ratio in them is a line of that file, rounded, and each ratio is the FID beside it over the teacher's row."""
    fid = {}
    for line in open(os.path.join(ROOT, 'figures', 'repro', 'fid.txt')):
        key, _, value = line.split()
        fid[key] = float(value)
    teacher = fid['teacher-heun35']
    checked = 0
    for path, heading, fid_col in [('README.md', '## Results', 'FID'),
                                   ('REPRODUCTION.md', '## The table', 'FID, seed 0')]:
        rows = _doc_table(path, heading)
        ratio_col = next(c for c in rows[0] if c.startswith('÷ teacher'))
        for row in rows:
            fids, ratios = row[fid_col].split(' / '), row[ratio_col].split(' / ')
            assert len(fids) == len(ratios), (path, row)
            for f, r in zip(fids, ratios):   # one line of fid.txt gives both, rounded as printed
                assert any('%.2f' % v == f and '%.3f' % (v / teacher) == r for v in fid.values()), (path, row, f, r)
                checked += 1
            for f in row.get('seed 1', '').split(' / '):
                assert not f or any('%.2f' % v == f for k, v in fid.items() if 'seed1' in k), (path, row, f)
    assert checked >= 30
    runs = {}                        # the levers' table: figures/repro/levers.txt (reproduce.sh's levers stage)
    for line in open(os.path.join(ROOT, 'figures', 'repro', 'levers.txt')):
        run, steps, teacher, _, _, nfe, value, _ = line.split()
        runs.setdefault((run, steps, float(teacher)), {})[nfe] = float(value)
    rows = _doc_table('REPRODUCTION.md', '**A longer teacher**')
    for row in rows:                 # each row is one run of the file: its teacher, both FIDs and both ratios
        printed = [row['teacher steps'], row['teacher FID (35 NFE)'], row['sCD 1 / 2 steps at step 1000'],
                   row['÷ teacher, 1 / 2 steps']]
        assert printed in ([steps, '%.2f' % t, '%.2f / %.2f' % (v['1'], v['2']), '%.3f / %.3f' % (v['1'] / t, v['2'] / t)]
                           for (_, steps, t), v in runs.items()), row
    assert len(rows) >= 2


def _pairs(path, key_of):
    """{run: '<1-step FID> / <2-step FID>'} (each to 2 decimals, as the docs print them) of a figures/repro file;
    key_of maps a line's fields to (run, NFE, FID), and runs without both NFEs are left out."""
    pairs = {}
    for line in open(os.path.join(ROOT, 'figures', 'repro', path)):
        run, nfe, value = key_of(line.split())
        pairs.setdefault(run, {})[nfe] = float(value)
    return {run: '%.2f / %.2f' % (v['1'], v['2']) for run, v in pairs.items() if set(v) == {'1', '2'}}


def test_the_lever_and_vsd_tables_are_their_files_digit_for_digit():
    """REPRODUCTION's screen table is figures/repro/screen.txt and its aVSD table figures/repro/vsd.txt (both written
    by reproduce.sh stages): each row's 1 / 2-step pair is one run of the file, rounded as printed."""
    screen = _pairs('screen.txt', lambda f: (f[0] + ' ' + f[1], f[2], f[3]))   # '<name> <steps> <NFE> <FID>'
    rows = _doc_table('REPRODUCTION.md', '## Levers')
    for row in rows:
        assert row['1 / 2 steps'] in screen.values(), row
        assert row["the preset's run"] in [v for k, v in screen.items() if '-preset ' in k], row
    assert len(rows) >= 5
    vsd = _pairs('vsd.txt', lambda f: (f[0][:-6], f[0][-5], f[1]))             # '<run>-<NFE>step <FID>'
    fid = _pairs('fid.txt', lambda f: (f[0][:-6], f[1], f[2]))                 # the student they continue
    rows = _doc_table('REPRODUCTION.md', '## sCD + adaptive VSD')
    for row in rows:
        assert '%s / %s' % (row['1 step'], row['2 steps']) in [*vsd.values(), fid['scd']], row
    assert len(rows) >= 4


def test_the_curve_and_tmid_tables_are_their_files_digit_for_digit():
    """REPRODUCTION's curve tables (every table whose first column is 'step') are figures/repro/curve.txt: each
    '<1> / <2>' cell is one method's pair at that step and the ratio beside it that 2-step FID over the teacher's line;
    its intermediate-time table is figures/repro/tmid.txt."""
    fids = {(f[0], f[1], f[2]): float(f[3])                                   # '<method> <step> <NFE> <FID>'
            for f in map(str.split, open(os.path.join(ROOT, 'figures', 'repro', 'curve.txt')))}
    curve = {(m, s): '%.2f / %.2f' % (v, fids[m, s, '2']) for (m, s, nfe), v in fids.items()
             if nfe == '1' and (m, s, '2') in fids}
    teacher = next(v for (m, _, _), v in fids.items() if m == 'teacher')
    lines = open(os.path.join(ROOT, 'REPRODUCTION.md'), encoding='utf-8').read().split('\n')
    checked = 0
    for i in (k for k, line in enumerate(lines) if line.startswith('| step |')):   # cells by place: these tables
        # repeat a header ('÷ teacher, 2 steps'), which _doc_table's dicts would merge
        for line in lines[i + 2:]:
            if not line.startswith('|'):
                break
            step, *cells = [c.strip() for c in line.strip('|').split('|')]
            for pair, ratio in zip(cells[::2], cells[1::2]):   # '<1> / <2>', then '÷ teacher, 2 steps'
                method = next((m for (m, s), v in curve.items() if v == pair and s == step), None)
                assert method, (step, pair)
                assert ratio == '%.3f' % (fids[method, step, '2'] / teacher), (step, pair, ratio)
                checked += 1
    assert checked >= 18
    tmid = {f[0]: float(f[1]) for f in map(str.split, open(os.path.join(ROOT, 'figures', 'repro', 'tmid.txt')))}
    rows = _doc_table('REPRODUCTION.md', '## The intermediate time')
    assert len(rows) == 1 and len(rows[0]) >= 7
    for t, printed in list(rows[0].items())[1:]:
        assert '%.2f' % tmid[t] == printed, (t, printed)


def test_sampling_refuses_what_would_give_wrong_images(tiny_teacher, image_folder, tmp_path, monkeypatch, capsys):
    import cli
    import edit
    import sample

    def fails(*args, match, main=sample.main):        # in this process (fast); the CLI path is sample.py's own
        monkeypatch.setattr(sys, 'argv', ['x.py', *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main_guard(main)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and last.startswith('error:') and match in last, (e.value.code, last)

    run_script('train_sct.py', '--preset', 'fashion-s', '--data', image_folder, *TINY, '--teacher', tiny_teacher,
               '--out', tmp_path / 'sct', '--steps', 1)
    sct = tmp_path / 'sct' / 'checkpoint.pt'
    png = tmp_path / 'x.png'
    fails(sct, '-n', 0, '--grid', png, match='at least 1')
    fails(sct, '--batch', 0, '--grid', png, match='at least 1')
    fails(sct, '--ts', 3.0, '--grid', png, match='must descend')
    fails(sct, '--ts', 0.5, 1.1, '--grid', png, match='must descend')
    fails(sct, '--sampler', 'heun', '--heun-steps', 1, '--grid', png, match='at least 2 steps')
    fails(sct, '--sigmas', 1.0, 5.0, '--grid', png, match='(sigma within (0, 80])')
    fails(sct, '--sigmas', 80, 0, '--grid', png, match='positive noise levels')
    for times, out in [(['--sigmas', 80, 1.3824], 'sig.png'), (['--ts', tf.T_MAX, math.atan(1.3824 / SD)], 'ts.png')]:
        monkeypatch.setattr(sys, 'argv', ['sample.py', *map(str, [sct, *times, '-n', 4, '--grid', tmp_path / out])])
        sample.main()                                 # CM 2023's times as sigmas == the same TrigFlow times
    assert open(tmp_path / 'sig.png', 'rb').read() == open(tmp_path / 'ts.png', 'rb').read()
    fails(sct, '--grid', tmp_path, match='is a folder')
    fails(sct, '--label', 3, '--grid', png, match='no classes')
    fails(tiny_teacher, '--steps', 2, '--grid', png, match='a teacher samples with EDM Heun')
    fails(sct, 'denoise', match='denoise needs --input', main=edit.main)
    img = os.path.join(image_folder, '000.png')
    fails(sct, 'inpaint', '--input', img, match='needs --mask', main=edit.main)
    fails(sct, 'interpolate', '--grid', tmp_path, match='is a folder', main=edit.main)
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / 'in.png')
    Image.fromarray(np.tile(np.uint8([0, 255]), (16, 8))).save(tmp_path / 'mask.png')
    for args, out in [(['inpaint', '--input', tmp_path / 'in.png', '--mask', tmp_path / 'mask.png'], 'in-inpaint'),
                      (['interpolate', '-n', 3, '--grid', tmp_path / 'i.png'], 'i')]:
        monkeypatch.setattr(sys, 'argv', ['edit.py', str(sct), *map(str, args), '--edit-steps', '3'])
        edit.main()                                   # the input (if any) and the result, side by side
        assert Image.open(tmp_path / f'{out}.png').size == ((2 if out != 'i' else 3) * 18 + 2, 20)
    ckpt = _ckpt(sct)
    ckpt['ema'][next(iter(ckpt['ema']))].fill_(float('nan'))
    torch.save(ckpt, tmp_path / 'nan.pt')
    fails(tmp_path / 'nan.pt', '--grid', png, match='hold NaN')
    torch.save([1], tmp_path / 'list.pt')
    fails(tmp_path / 'list.pt', '--grid', png, match='not a checkpoint')
    torch.save({'net': {}}, tmp_path / 'dict.pt')
    fails(tmp_path / 'dict.pt', '--grid', png, match='not a checkpoint')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)              # torch.jit is deprecated
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / 'ts.pt'))
    fails(tmp_path / 'ts.pt', '--grid', png, match='checkpoint')
    assert not os.path.exists(png) and not [f for f in os.listdir(tmp_path) if 'tmp' in f]


class _RunsCode:
    """Unpickling this calls os.mkdir(path): a stand-in for any code a file can carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _edm_pickle(path, state, edm_kwargs, precond='EDMPrecond', extra=None, child=('model', 'SongUNet')):
    """Write `state` ({EDM name: tensor}) as EDM's training loop pickles a network: {'ema': EDMPrecond(model=SongUNet)}
    of torch_utils.persistence objects (their reconstructor, their class record with the module source and __dict__),
    enc/dec as stock torch.nn.ModuleDicts. The module source raises if anything ever ran it."""
    fake = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('never called')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Record(torch.nn.Module):                      # a persistent object as EDM's persistence.py reduces one
        def __init__(self, class_name, **kwargs):
            super().__init__()
            self._name, self._init_kwargs = class_name, kwargs

        def __reduce__(self):
            state = super().__reduce__()[2]
            return _reconstruct_persistent_obj, (dict(type='class', version=6, class_name=self._name, state=state,
                                                      module_src='raise SystemExit("the module source ran")'),)

    root = Record(precond, img_resolution=edm_kwargs['img_resolution'], img_channels=edm_kwargs.get('in_channels'),
                  label_dim=edm_kwargs.get('label_dim', 0), model_type='SongUNet')
    root.add_module(child[0], Record(child[1], **edm_kwargs))
    for name, value in state.items():
        *parts, leaf = name.split('.')
        m = getattr(root, child[0])
        for p in parts:
            if not hasattr(m, p):
                m.add_module(p, torch.nn.ModuleDict() if p in ('enc', 'dec') else Record('UNetBlock'))
            m = m[p] if isinstance(m, torch.nn.ModuleDict) else getattr(m, p)
        if leaf in ('resample_filter', 'freqs', 'phases'):              # buffers
            m.register_buffer(leaf, value)
        else:
            setattr(m, leaf, torch.nn.Parameter(value))
    pkg = types.ModuleType('torch_utils')
    pkg.persistence = fake
    sys.modules.update({'torch_utils': pkg, 'torch_utils.persistence': fake})
    try:
        with open(path, 'wb') as f:
            pickle.dump(dict(ema=root, loss_fn=None, dataset_kwargs=dict(class_name='training.dataset.ImageFolder'),
                             **(extra or {})), f)
    finally:
        del sys.modules['torch_utils'], sys.modules['torch_utils.persistence']


def _edm_names(ours, res):
    """This project's DDPMpp(edm=True) state under EDM's SongUNet names (the inverse of edm_pickle.convert)."""
    names = {'emb_label.': 'map_label.', 'map0.': 'map_layer0.', 'map1.': 'map_layer1.',
             'out_norm.': f'dec.{res}x{res}_aux_norm.', 'out_conv.': f'dec.{res}x{res}_aux_conv.'}
    out = {}
    for k, v in ours.items():
        if k == 'emb_time.freqs':
            continue
        for a, b in names.items():
            k = b + k[len(a):] if k.startswith(a) else k
        out[k] = v
    return out


def test_edm_pickles_load_as_data_and_anything_else_is_refused(image_folder, tmp_path):
    """An EDM network pickle (persistence objects, written here as EDM's code writes them) is read without running its
    module source or importing torch_utils, and converts to model.DDPMpp(edm=True) with every tensor equal; EDM's
    extra tensors (the fixed resampling filter, the augmentation map) are dropped. A pickle naming any other global
    gets one error line and its code never runs; an ADM or NCSN++ network is named and refused. Then sCD trains from
    the pickle as --teacher and samples (the smoke run)."""
    import edm_pickle
    torch.manual_seed(0)
    kw = dict(model.DDPMPP_PRESETS['edm-tiny'], arch='ddpmpp')
    ours = randomize_(model.build(kw)).state_dict()
    edm = _edm_names(ours, 16)
    edm['enc.8x8_down.conv0.resample_filter'] = torch.full((1, 1, 2, 2), 0.25)
    edm['map_augment.weight'] = torch.randn(32, 9)
    song = dict(img_resolution=16, in_channels=1, out_channels=1, augment_dim=9, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[8], dropout=0.13, embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1])
    pkl = tmp_path / 'edm.pkl'
    _edm_pickle(pkl, edm, song)
    assert 'torch_utils' not in sys.modules
    obj = edm_pickle.load(pkl)['ema']
    assert obj.class_name == 'EDMPrecond' and 'torch_utils' not in sys.modules
    got_kw, got = edm_pickle.convert(obj, pkl)
    assert model.architecture(got_kw) == model.architecture(kw) and got_kw['dropout'] == 0.13
    assert sorted(got) == sorted(ours) and all(torch.equal(got[k], ours[k]) for k in ours)
    # refused: another global (the code never runs), another network, a torch.save file
    marker = tmp_path / 'the-code-ran'
    _edm_pickle(tmp_path / 'evil.pkl', edm, song, extra=dict(x=_RunsCode(str(marker))))
    with pytest.raises(cli.UserError, match='names posix.mkdir, which an EDM/EDM2 network pickle does not need'):
        edm_pickle.load(tmp_path / 'evil.pkl')
    assert not marker.exists()
    _edm_pickle(tmp_path / 'ncsn.pkl', edm, dict(song, embedding_type='fourier'))
    with pytest.raises(cli.UserError, match="embedding_type=fourier.*not NCSN"):
        edm_pickle.convert(edm_pickle.load(tmp_path / 'ncsn.pkl')['ema'])
    _edm_pickle(tmp_path / 'vp.pkl', edm, song, precond='VPPrecond')
    with pytest.raises(cli.UserError, match='VPPrecond, not EDMPrecond'):
        edm_pickle.convert(edm_pickle.load(tmp_path / 'vp.pkl')['ema'])
    # EDM2: Precond(unet=UNet), names as model.UNet(edm2=True)'s, the MPFourier buffers included
    kw2 = dict(model.UNET_PRESETS['tiny'], arch='unet', edm2=True, attention_axis='pixels')
    kw2.update(dropout_res=16, label_balance=0.5, concat_balance=0.5)
    ours2 = randomize_(model.build(kw2)).state_dict()
    unet = dict(img_resolution=16, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], channels_per_head=8, dropout=0.0)
    _edm_pickle(tmp_path / 'edm2.pkl', ours2, unet, precond='Precond', child=('unet', 'UNet'))
    got_kw, got = edm_pickle.convert(edm_pickle.load(tmp_path / 'edm2.pkl')['ema'])
    assert model.architecture(got_kw) == model.architecture(kw2)
    assert sorted(got) == sorted(ours2) and all(torch.equal(got[k], ours2[k]) for k in ours2)
    torch.save({'a': 1}, tmp_path / 'x.pkl')
    with pytest.raises(cli.UserError, match='torch.save file'):
        edm_pickle.load(tmp_path / 'x.pkl')
    p = run_script('train_scd.py', '--preset', 'cifar10-edm', '--data', image_folder, *TINY, '--model', 'edm-tiny',
                   '--teacher', tmp_path / 'evil.pkl', '--out', tmp_path / 'run', '--steps', 1, check=False)
    assert p.returncode == 2 and 'refused' in p.stderr.strip().splitlines()[-1] and not marker.exists()
    # the smoke run: sCD from the converted teacher (the student is EDM's network, started from it), then samples
    run_script('train_scd.py', '--preset', 'cifar10-edm', '--data', image_folder, *TINY, '--model', 'edm-tiny',
               '--teacher', pkl, '--out', tmp_path / 'run', '--steps', 2, '--batch', 4)
    student = _ckpt(tmp_path / 'run' / 'checkpoint.pt')
    assert student['model_kwargs']['edm'] and any(not torch.equal(student['net'][k], v) for k, v in ours.items())
    run_script('sample.py', tmp_path / 'run' / 'checkpoint.pt', '--steps', 2, '-n', 4, '--grid', tmp_path / 's.png')
    assert Image.open(tmp_path / 's.png').size[0] > 16


def test_an_edm2_teacher_refits_and_teaches(image_folder, tmp_path):
    """EDM2's route (issue 24): train_teacher.py --init X.pkl starts a U-Net with the paper's time path from an EDM2
    pickle (every weight but the Fourier embedding, the output gain negated: EDM2's F is -F), re-fits it, and that
    re-fit is the student of the EDM2 network, which teaches as it is (--teacher X.pkl --student). A guide network
    (--guide-net) replaces the teacher's null label in the guided velocity."""
    import checkpoint as ck
    import train_scd
    kw = dict(model.UNET_PRESETS['tiny'], arch='unet', edm2=True, attention_axis='pixels', dropout_res=16)
    edm2 = randomize_(model.build(kw)).state_dict()
    unet = dict(img_resolution=16, img_channels=1, label_dim=0, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], channels_per_head=8)
    _edm_pickle(tmp_path / 'edm2.pkl', edm2, unet, precond='Precond', child=('unet', 'UNet'))
    net = model.build(dict(model.UNET_PRESETS['tiny'], arch='unet', attention_axis='pixels'))
    ck.init_from_edm2(net, ck.read_edm2_init(tmp_path / 'edm2.pkl'), tmp_path / 'edm2.pkl')
    for k, v in net.state_dict().items():
        assert k == 'emb_time.freqs' or torch.equal(v, -edm2[k] if k == 'out_gain' else edm2[k]), k
    with pytest.raises(cli.UserError, match="another U-Net than --model's"):
        ck.init_from_edm2(model.build(dict(model.UNET_PRESETS['tiny'], arch='unet', model_channels=16)),
                          ck.read_edm2_init(tmp_path / 'edm2.pkl'), tmp_path / 'edm2.pkl')
    common = ['--preset', 'fashion-s', '--data', image_folder, *TINY]
    run_script('train_teacher.py', '--preset', 'fashion-s', '--data', image_folder, *TINY[:-2], '--init',
               tmp_path / 'edm2.pkl', '--out', tmp_path / 'refit', '--steps', 2, '--label-dropout', 0)
    run_script('train_scd.py', *common, '--teacher', tmp_path / 'edm2.pkl', '--student',
               tmp_path / 'refit' / 'checkpoint.pt', '--s-max', 1, '--out', tmp_path / 'scd', '--steps', 2)
    assert not _ckpt(tmp_path / 'scd' / 'checkpoint.pt')['model_kwargs'].get('edm2')     # the paper's time path
    p = run_script('train_scd.py', *common, '--teacher', tmp_path / 'edm2.pkl', '--s-max', 2, '--out',
                   tmp_path / 'x', '--steps', 1, check=False)
    assert p.returncode == 2 and 'guide with --guide-net' in p.stderr.strip().splitlines()[-1]
    # the guide replaces exactly the null-label branch
    teacher, student = tiny_unet(label_dim=3).eval(), tf.JVP(tiny_unet(label_dim=3, cfg_embed=True))
    x0, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    def loss(guide):
        torch.manual_seed(0)
        return train_scd.scd_loss(student, teacher, x0, labels, P_mean=-1.0, P_std=1.6, r=1.0, s_max=2.0,
                                  guide=guide)[0]
    null = lambda u, t, labels: teacher(u, t, torch.full_like(labels, -1))
    assert torch.equal(loss(None), loss(null)) and not torch.equal(loss(None), loss(lambda u, t, l: teacher(u, t, l)))


def test_a_checkpoint_that_carries_code_is_refused_before_it_runs(tiny_teacher, image_folder, tmp_path):
    """sample.py and --teacher read checkpoints with weights_only=True: a file whose pickle would call a function
    gets one error line and exit 2, and the function never runs."""
    marker = tmp_path / 'the-code-ran'
    ckpt = _ckpt(tiny_teacher)
    ckpt['sampling'] = _RunsCode(str(marker))
    torch.save(ckpt, tmp_path / 'evil.pt')
    for args in (['sample.py', tmp_path / 'evil.pt', '--grid', tmp_path / 'x.png'],
                 ['train_scd.py', '--preset', 'fashion-s', '--data', image_folder, *TINY, '--teacher',
                  tmp_path / 'evil.pt', '--s-max', 1, '--out', tmp_path / 'run', '--steps', 1]):
        p = run_script(*args, check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith('error:') and 'run code' in last, (p.returncode, p.stderr[-2000:])
        assert not marker.exists(), args[0]
    torch.load(tmp_path / 'evil.pt', weights_only=False)       # the same file, read as before: the code runs
    assert marker.is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Data: named datasets from the shared folder (skipped where it is absent), image folders, zips, latents, grids.

import io  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import cli  # noqa: E402
import data  # noqa: E402
import latents  # noqa: E402

SHARED_DATA = os.environ.get('SCM_DATA', os.path.join(ROOT, '..', 'shared', 'data'))  # as the scripts


def _shared(*parts):
    p = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(p):
        pytest.skip(f'{p} not found (set SCM_DATA to the data folder)')
    return p


def _png(path, a):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path)


def test_data_fashion_mnist_from_shared():
    _shared('fashion-mnist', 't10k-images-idx3-ubyte.gz')
    ds = data.load_dataset('fashion-mnist', SHARED_DATA, 'test', download=False)
    assert len(ds) == 10000 and ds.shape == (1, 28, 28) and ds.num_classes == 10 and not ds.is_latent
    x, y = ds.get_batch(torch.arange(500))
    assert x.dtype == torch.float32 and x.shape == (500, 1, 28, 28) and -1 <= x.min() and x.max() <= 1
    assert torch.equal(x[7], ds[7][0]) and int(y[7]) == ds[7][1]
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


def test_data_cifar10_jpeg_from_shared():
    _shared('cifar10-jpeg', 'test.tar.gz')
    ds = data.load_dataset('cifar10', SHARED_DATA, 'test', download=False)
    assert len(ds) == 10000 and ds.shape == (3, 32, 32) and ds.num_classes == 10
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    mean = ds.images.float().mean((0, 2, 3)) / 255           # CIFAR-10 test channel means ~ (0.494, 0.485, 0.450)
    assert torch.allclose(mean, torch.tensor([0.494, 0.485, 0.450]), atol=0.01)


def test_data_download_checks_md5(monkeypatch, tmp_path):
    """file:// URLs stand in for the network: MNIST's shared files are the originals (md5 passes), Fashion-MNIST's
    are recompressed copies (md5 fails, and the bad file is removed)."""
    _shared('mnist', 't10k-images-idx3-ubyte.gz')
    _shared('fashion-mnist', 't10k-images-idx3-ubyte.gz')
    monkeypatch.setattr(data, 'MNIST_URL', 'file://' + os.path.abspath(os.path.join(SHARED_DATA, 'mnist')) + '/')
    ds = data.load_dataset('mnist', str(tmp_path), 'test', download=True)
    assert len(ds) == 10000 and ds.num_classes == 10
    monkeypatch.setattr(data, 'FASHION_URL',
                        'file://' + os.path.abspath(os.path.join(SHARED_DATA, 'fashion-mnist')) + '/')
    with pytest.raises(data.DataError, match='md5'):
        data.load_dataset('fashion-mnist', str(tmp_path), 'test', download=True)
    assert os.listdir(tmp_path / 'fashion-mnist') == []
    with pytest.raises(data.DataError, match='missing'):
        data.load_dataset('fashion-mnist', str(tmp_path), 'test', download=False)


def test_data_image_folder_and_zip(tmp_path):
    g = np.random.default_rng(0)
    imgs = {f'{c}/{i}.png': g.integers(0, 256, (6, 5, 3), dtype=np.uint8) for c in ('dog', 'cat') for i in range(3)}
    for rel_path, a in imgs.items():
        _png(str(tmp_path / 'cls' / rel_path), a)
    ds = data.load_dataset(str(tmp_path / 'cls'))
    assert len(ds) == 6 and ds.shape == (3, 6, 5) and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]               # sorted class folders: cat, dog
    assert np.array_equal(data.to_uint8(ds[0][0][None])[0], imgs['cat/0.png'])
    zp = tmp_path / 'cls.zip'
    with zipfile.ZipFile(zp, 'w') as z:                           # wrapped in one top folder, as `zip -r` makes
        for rel_path in imgs:
            z.write(tmp_path / 'cls' / rel_path, 'wrap/' + rel_path)
    dz = data.load_dataset(str(zp))
    assert torch.equal(dz.get_batch(range(6))[0], ds.get_batch(range(6))[0]) and torch.equal(dz.labels, ds.labels)
    _png(str(tmp_path / 'flat' / 'a.png'), imgs['cat/0.png'][:, :, 0])
    _png(str(tmp_path / 'flat' / 'b.png'), np.zeros((7, 5), np.uint8))
    df = data.load_dataset(str(tmp_path / 'flat'))
    assert df.shape == (1, 6, 5) and df.num_classes == 0 and df[0][1] == -1
    with pytest.raises(data.DataError, match='b.png is 5x7'):
        df[1]


def test_data_edm2_dataset_tool_zip_keeps_its_labels(tmp_path):
    """A zip in EDM2's dataset_tool.py layout (numbered subfolders, labels in dataset.json) loads with those labels,
    not its subfolders as classes; make_dataset.py writes that layout from class folders (center-crop-dhariwal)."""
    g = np.random.default_rng(0)
    imgs = [g.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    names = [f'{i // 2:05d}/img{i:08d}.png' for i in range(5)]     # 3 subfolders, which must not become classes
    zp = tmp_path / 'edm2.zip'
    with zipfile.ZipFile(zp, 'w') as z:
        for n, a in zip(names, imgs):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format='png')
            z.writestr(n, buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [[n, y] for n, y in zip(names, [7, 0, 998, 7, 3])]}))
    ds = data.load_dataset(str(zp))
    assert ds.labels.tolist() == [7, 0, 998, 7, 3] and ds.num_classes == 999 and ds.shape == (3, 8, 8)
    assert np.array_equal(data.to_uint8(ds[2][0][None])[0], imgs[2])
    with zipfile.ZipFile(tmp_path / 'bad.zip', 'w') as z:          # a file dataset.json does not name
        z.writestr(names[0], zipfile.ZipFile(zp).read(names[0]))
        z.writestr('dataset.json', json.dumps({'labels': [['other.png', 1]]}))
    with pytest.raises(data.DataError, match=f'no entry {names[0]!r}'):
        data.load_dataset(str(tmp_path / 'bad.zip'))
    for c, size in [('n01440764', (90, 60)), ('n01443537', (50, 130))]:  # ImageNet-like class folders, any size
        for i in range(2):
            _png(str(tmp_path / 'raw' / c / f'{i}.JPEG.png'), g.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    for out in ('in16.zip', 'in16'):
        run_script('make_dataset.py', tmp_path / 'raw', '--resolution', 16, '--out', tmp_path / out)
        made = data.load_dataset(str(tmp_path / out))
        assert made.labels.tolist() == [0, 0, 1, 1] and made.shape == (3, 16, 16) and made.num_classes == 2
        src = Image.open(tmp_path / 'raw' / 'n01443537' / '1.JPEG.png').convert('RGB')
        assert np.array_equal(data.to_uint8(made[3][0][None])[0], np.asarray(data.center_crop(src, 16)))
    assert sorted(os.listdir(tmp_path / 'in16')) == ['00000', 'dataset.json'] and not any(
        n.endswith('.tmp') for n in os.listdir(tmp_path))


def test_cifar_pickles_cannot_run_code(tmp_path):
    """The official CIFAR-10 tarball is read with an unpickler that builds arrays only: a batch whose pickle would
    call os.mkdir is refused with one DataError, before the call; real-shaped batches load."""
    import pickle
    import tarfile

    def tarball(path, batch_bytes):
        with tarfile.open(path, 'w:gz') as tar:
            info = tarfile.TarInfo('cifar-10-batches-py/test_batch')
            info.size = len(batch_bytes)
            tar.addfile(info, io.BytesIO(batch_bytes))
    g = np.random.default_rng(0)
    batch = {b'data': g.integers(0, 256, (10000, 3072), dtype=np.uint8), b'labels': list(range(10)) * 1000}
    tarball(tmp_path / 'cifar-10-python.tar.gz', pickle.dumps(batch, protocol=2))
    ds = data.load_dataset('cifar10', str(tmp_path), 'test', download=False)
    assert len(ds) == 10000 and torch.equal(ds.images[1].reshape(-1), torch.from_numpy(batch[b'data'][1]))

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / 'ran'),)
    evil = tmp_path / 'evil'
    evil.mkdir()
    tarball(evil / 'cifar-10-python.tar.gz', pickle.dumps({b'data': RunsCode()}, protocol=2))
    with pytest.raises(data.DataError, match='names posix.mkdir'):
        data.load_dataset('cifar10', str(evil), 'test', download=False)
    assert not (tmp_path / 'ran').exists()


def test_data_latents(tmp_path):
    mean = torch.tensor(latents.LATENT_MEAN).view(1, 4, 1, 1)
    std = torch.tensor(latents.LATENT_STD).view(1, 4, 1, 1)
    z = torch.randn(512, 4, 4, 4) * std + mean
    np.save(tmp_path / 'lat.npy', z.numpy())
    np.save(tmp_path / 'lat.labels.npy', np.arange(512) % 3)
    ds = latents.load(str(tmp_path / 'lat.npy'))
    assert ds.is_latent and ds.shape == (4, 4, 4) and ds.num_classes == 3 and len(ds) == 512
    x, y = ds.get_batch(torch.arange(512))
    assert torch.allclose(x.std((0, 2, 3)), torch.full((4,), 0.5), atol=0.03)    # sigma_d = 0.5 after normalizing
    assert torch.allclose(latents.denormalize(x), z, atol=1e-4) and y.tolist()[:4] == [0, 1, 2, 0]
    np.save(tmp_path / 'bad.npy', np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(data.DataError, match='4 channels'):
        latents.load(str(tmp_path / 'bad.npy'))


def test_latents_of_part_of_imagenets_classes_train_a_1000_class_model(tmp_path):
    """Latents of a subset of ImageNet (labels below 1000, fewer classes) fit the 1000-class presets; the class count
    comes from encode's .json when it has one; labels beyond the model's classes are refused."""
    import argparse
    import train_util
    z = torch.randn(64, 4, 4, 4) * torch.tensor(latents.LATENT_STD).view(1, 4, 1, 1) + \
        torch.tensor(latents.LATENT_MEAN).view(1, 4, 1, 1)
    np.save(tmp_path / 'lat.npy', z.numpy())
    np.save(tmp_path / 'lat.labels.npy', np.arange(64) % 972)
    ds = latents.load(str(tmp_path / 'lat.npy'))
    args = argparse.Namespace(model='s', dropout=0.0)
    ds.shape = (4, 64, 64)                                        # the 's' U-Net's input; the loader gave 4x4x4
    assert ds.num_classes == 64 and train_util.model_kwargs_for(args, ds)['label_dim'] == 1000
    ds.num_classes = 1001
    with pytest.raises(cli.UserError, match=r'labels 0..1000\) but model .s. takes labels 0..999'):
        train_util.model_kwargs_for(args, ds)
    post = torch.cat([z, torch.zeros_like(z)], 1)                 # encode's format: posterior mean and std, a .json
    np.save(tmp_path / 'post.npy', post.numpy())
    np.save(tmp_path / 'post.labels.npy', np.arange(64) % 3)
    (tmp_path / 'post.json').write_text(json.dumps(dict(vae='x', mean=latents.LATENT_MEAN, std=latents.LATENT_STD,
                                                         classes=972)))
    assert latents.load(str(tmp_path / 'post.npy')).num_classes == 972


def test_latents_of_another_encoding_are_refused(tmp_path):
    """The loader's scale check: raw latents whose normalized per-channel mean or std is off from (0, sigma_d) --
    here shifted as [0, 1] pixels shift them (EDM2's tool), or not SD-VAE-like at all -- get one clear line."""
    mean = torch.tensor(latents.LATENT_MEAN).view(1, 4, 1, 1)
    std = torch.tensor(latents.LATENT_STD).view(1, 4, 1, 1)
    torch.manual_seed(0)
    for name, z in [('shifted', torch.randn(64, 4, 4, 4) * std + mean + 0.8 * std),
                    ('unit', torch.randn(64, 4, 4, 4))]:
        np.save(tmp_path / f'{name}.npy', z.numpy())
        with pytest.raises(data.DataError, match=r'mean \[.*encoded another way.*latents.py encode'):
            latents.load(str(tmp_path / f'{name}.npy'))
    np.save(tmp_path / 'post.npy', torch.randn(4, 8, 4, 4).numpy())           # 8 channels need latents.py's .json
    with pytest.raises(data.DataError, match='4 channels'):
        latents.load(str(tmp_path / 'post.npy'))
    (tmp_path / 'post.json').write_text('{"vae": "x"}')
    with pytest.raises(data.DataError, match='post.json'):
        latents.load(str(tmp_path / 'post.npy'))


def test_center_crop_is_adms():
    """data.center_crop (ADM / EDM2's ImageNet preprocessing): box-halving while the short side is >= 2x, bicubic to
    the size, the central square. A 64x32 image whose middle half is blue becomes all blue at 16x16."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :16] = a[:, 48:] = (255, 0, 0)
    a[:, 16:48] = (0, 0, 255)
    out = data.center_crop(Image.fromarray(a), 16)
    assert out.size == (16, 16) and (np.asarray(out) == (0, 0, 255)).all()
    assert data.center_crop(Image.new('RGB', (30, 50)), 16).size == (16, 16)


@pytest.fixture(scope='module')
def tiny_vae(tmp_path_factory):
    """A randomly initialized diffusers AutoencoderKL built from a config (no download), saved as a local folder."""
    diffusers = pytest.importorskip('diffusers', reason='the SD-VAE pipeline needs diffusers (README: test install)')
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                                  up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)
    path = tmp_path_factory.mktemp('vae')
    vae.save_pretrained(path)
    return path, vae.eval()


def test_the_papers_vae_loads_by_name_where_the_hub_is_reachable():
    """stabilityai/sd-vae-ft-mse by name (downloads ~335 MB once): 8x downsampling to 4 channels, and a smooth image
    comes back from its posterior mean. Skipped offline (this CI) after one DNS lookup."""
    pytest.importorskip('diffusers', reason='the SD-VAE pipeline needs diffusers (README: test install)')
    import socket
    import latents
    try:
        socket.getaddrinfo('huggingface.co', 443)
    except OSError:
        pytest.skip('huggingface.co is not reachable from here: the real SD-VAE is not loaded')
    vae = latents.load_vae(latents.PAPER_VAE, 'cpu')
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing='ij')
    x = torch.stack([xx, yy, xx * yy])[None] * 0.8
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        back = vae.decode(post.mean).sample
    assert post.mean.shape == (1, 4, 8, 8) and rel(back, x) < 0.2


def test_latents_encoded_like_edm2(tiny_vae, tmp_path):
    """`latents.py encode --like edm2`: EDM2's encoding, the VAE of [0, 1] pixels (StabilityVAEEncoder), so that the
    data matches an EDM2 teacher; decoding maps the VAE's [0, 1] back to [-1, 1]. With sd-vae-ft-mse it normalizes
    with EDM2's raw mean and std (final std 0.5); any other VAE with what it measured."""
    vae_dir, vae = tiny_vae
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(4):
        Image.new('RGB', (16, 16), (200, 30, 90 + 40 * i)).save(folder / f'{i}.png')
    out = tmp_path / 'lat.npy'
    run_script('latents.py', 'encode', folder, '--out', out, '--resolution', 16, '--vae', vae_dir, '--like', 'edm2')
    meta, z = json.loads((tmp_path / 'lat.json').read_text()), np.load(out)
    assert meta['pixels'] == '[0, 1]' and meta['stats'] == 'measured while encoding'
    with torch.no_grad():
        x = (torch.tensor([200, 30, 90], dtype=torch.float32) / 255).view(1, 3, 1, 1).expand(1, 3, 16, 16)
        post = vae.encode(x).latent_dist                                        # EDM2: pixels / 255
        assert np.abs(z[0, :4] - post.mean[0].numpy()).max() < 1e-4
        stats = latents.load(str(out)).latent_stats
        lat = torch.randn(2, 4, 8, 8)
        want = vae.decode(latents.denormalize(lat, mean=stats['mean'], std=stats['std'])).sample * 2 - 1
        assert stats['pixels'] == '[0, 1]' and torch.allclose(latents.decode(lat, stats), want.clamp(-1, 1))


def test_latent_pipeline_round_trip(tiny_vae, tmp_path):
    """encode (center crop, [-1, 1], the VAE's posterior) -> load (normalized posterior samples, std 0.5) -> train a
    teacher 2 steps -> sample.py decodes to RGB images with the same VAE; latents.py decode writes a grid."""
    vae_dir, vae = tiny_vae
    folder = tmp_path / 'imgs'
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(20, 24), (40, 32), (16, 16), (33, 17), (24, 24), (50, 20)]):
        (folder / 'ab'[i // 3]).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i == 0:
            img = Image.new('RGB', (w, h), (200, 30, 90))                      # uniform: its crop is known
        if i == 4:
            img = img.convert('L')                                              # grayscale is read as RGB
        img.save(folder / 'ab'[i // 3] / f'{i}.png')
    out = tmp_path / 'lat.npy'
    run_script('latents.py', 'encode', folder, '--out', out, '--resolution', 16, '--vae', vae_dir, '--batch', 4,
               '--workers', 0)
    assert sorted(os.listdir(tmp_path)) == ['imgs', 'lat.json', 'lat.labels.npy', 'lat.npy']   # no temporary files
    z = np.load(out)
    meta = json.loads((tmp_path / 'lat.json').read_text())
    assert z.shape == (6, 8, 8, 8) and np.load(tmp_path / 'lat.labels.npy').tolist() == [0, 0, 0, 1, 1, 1]
    assert meta['pixels'] == '[-1, 1]' and meta['stats'] == 'measured while encoding'
    with torch.no_grad():                                                       # the uniform image, encoded here
        x = (torch.tensor([200, 30, 90], dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(1, 3, 16, 16)
        post = vae.encode(x).latent_dist
    assert np.abs(z[0, :4] - post.mean[0].numpy()).max() < 1e-4 and np.abs(z[0, 4:] - post.std[0].numpy()).max() < 1e-4

    ds = latents.load(str(out))
    assert ds.is_latent and ds.shape == (4, 8, 8) and ds.num_classes == 2
    assert torch.equal(ds.get_batch(range(6), seed=1)[0], ds.get_batch(range(6), seed=1)[0])
    assert not torch.equal(ds.get_batch(range(6), seed=1)[0], ds.get_batch(range(6), seed=2)[0])
    draws = ds.get_batch([1] * 4000, seed=3)[0]                                 # one posterior, many samples
    m, s = torch.tensor(meta['mean']).view(4, 1, 1), torch.tensor(meta['std']).view(4, 1, 1)
    zm, zs = torch.from_numpy(z[1, :4]), torch.from_numpy(z[1, 4:])
    assert (draws.mean(0) - (zm - m) * 0.5 / s).abs().max() < 0.1 * (zs * 0.5 / s).max()
    assert rel(draws.std(0), zs * 0.5 / s) < 0.05
    assert torch.allclose(ds.get_batch(list(range(6)) * 100, seed=4)[0].std((0, 2, 3)),
                          torch.full((4,), 0.5), atol=0.1)

    run = tmp_path / 'run'
    common = ['--preset', 'fashion-s', '--data', out, '--model', 'DiT-tiny', '--batch', 6, '--sample-every', 0]
    whole = run_script('train_teacher.py', *common, '--steps', 2, '--out', run).stdout
    run_script('train_teacher.py', *common, '--steps', 1, '--out', tmp_path / 'r2')
    resumed = run_script('train_teacher.py', *common, '--steps', 2, '--out', tmp_path / 'r2', '--resume').stdout
    sha = lambda out: out[out.index('weights sha256'):].split()[2]
    assert sha(whole) == sha(resumed)                           # the posterior draws repeat on resume
    run_script('train_teacher.py', *common[:-1], 1, '--sample-heun-steps', 2, '--steps', 1, '--out', tmp_path / 'g')
    grid = Image.open(tmp_path / 'g' / 'samples' / '0000001-heun3.png')    # the grid decoded by the same VAE
    assert grid.mode == 'RGB' and grid.size == (8 * 18 + 2, 8 * 18 + 2)
    assert _ckpt(run / 'checkpoint.pt')['data']['latents']['vae'] == str(vae_dir)
    run_script('sample.py', run / 'checkpoint.pt', '-n', 3, '--heun-steps', 2, '--npz', tmp_path / 's.npz',
               '--grid', tmp_path / 's.png')
    samples = np.load(tmp_path / 's.npz')['samples']
    assert samples.shape == (3, 16, 16, 3) and samples.dtype == np.uint8 and samples.std() > 0
    p = run_script('edit.py', run / 'checkpoint.pt', 'interpolate', '--label', 0, check=False)
    assert p.returncode == 2 and 'edits work on pixels' in p.stderr
    run_script('latents.py', 'decode', out, '--grid', tmp_path / 'd.png', '-n', 6)
    assert Image.open(tmp_path / 'd.png').mode == 'RGB'
    for args, match in [(['encode', tmp_path / 'nothing', '--out', tmp_path / 'x.npy'], 'not a dataset name'),
                        (['encode', folder, '--out', tmp_path / 'x.bin'], 'must end in .npy'),
                        (['encode', folder, '--out', tmp_path / 'x.npy', '--resolution', 12], 'multiple of 8'),
                        (['encode', out, '--out', tmp_path / 'x.npy'], 'image folder or a .zip'),
                        (['decode', folder, '--grid', tmp_path / 'x.png'], 'not a .npy of latents')]:
        p = run_script('latents.py', *args, check=False)
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith('error:') and match in p.stderr, \
            (args, p.stderr[-500:])
    assert not (tmp_path / 'x.npy').exists()


def test_data_save_grid_round_trip(tmp_path):
    x = torch.rand(5, 3, 4, 6) * 2 - 1
    path = str(tmp_path / 'sub' / 'grid.png')
    data.save_grid(x, path, nrow=3)
    g = np.asarray(Image.open(path))
    assert g.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3) and not os.path.exists(path + '.tmp')
    u = data.to_uint8(x)
    for k in range(5):
        r, c = divmod(k, 3)
        assert np.array_equal(g[2 + r * 6: 2 + r * 6 + 4, 2 + c * 8: 2 + c * 8 + 6], u[k])
    assert data.load_image(path, 1).shape == (1, 1, g.shape[0], g.shape[1])
    assert data.to_uint8(torch.tensor([-2.0, -1, 0, 1, 2]).view(1, 1, 1, 5)).ravel().tolist() == [0, 0, 128, 255, 255]


def test_data_errors(tmp_path):
    with pytest.raises(data.DataError, match="'xyz' is not a dataset name"):
        data.load_dataset('xyz')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(data.DataError, match='no images'):
        data.load_dataset(str(tmp_path / 'empty'))
    (tmp_path / 'bad.zip').write_bytes(b'not a zip')
    with pytest.raises(data.DataError, match='zip'):
        data.load_dataset(str(tmp_path / 'bad.zip'))
    with pytest.raises(data.DataError, match='missing'):
        data.load_dataset('mnist', str(tmp_path), 'test', download=False)
    with pytest.raises(data.DataError, match='does not exist'):
        data.load_image(str(tmp_path / 'nope.png'), 3)


def test_power_ema_has_the_requested_relative_std():
    """EDM2's power-function EMA: beta_k = (1 - 1/k)^(gamma + 1) weights the snapshot of step i by ~ i^gamma; the
    std of that profile over time in units of the training length, i/K, is sigma_rel (EDM2 §3.1). Checked by running
    the recursion."""
    import train_util
    from types import SimpleNamespace
    for std in (0.05, 0.10, 0.2):
        args = SimpleNamespace(ema_std=std)
        K = 20000
        w = torch.zeros(K, dtype=torch.float64)            # weight of step i's weights in the EMA after K steps
        for k in range(1, K + 1):
            beta = train_util.ema_beta(args, k, 1)
            w[:k - 1] *= beta
            w[k - 1] = 1 - beta
        assert abs(w.sum().item() - 1) < 1e-9
        x = torch.arange(1, K + 1, dtype=torch.float64) / K
        mean = (w * x).sum()
        rel_std = (w * (x - mean) ** 2).sum().sqrt().item()
        assert abs(rel_std / std - 1) < 0.01, (std, rel_std)
    # the half-life EMA: after one half-life of images (past the rampup) an old weight has halved
    args = SimpleNamespace(ema_std=0.0, ema_halflife_mimg=0.5)
    betas = [train_util.ema_beta(args, k, 512) for k in range(10**6 // 512 * 40, 10**6 // 512 * 40 + 977)]
    assert abs(math.prod(betas) - 0.5) < 1e-3


# ---------------------------------------------------------------------------------------------------------------
# sample.py: editing operators, and sharded sampling reproduces a single process


def test_editing_operators_are_invertible_and_keep_their_subspace():
    import edit
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    Q = edit.orthogonal_basis(edit.GRAY)
    assert torch.allclose(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q[:, 0], torch.tensor(edit.GRAY, dtype=torch.float64) / math.hypot(*edit.GRAY))
    masks = (torch.rand_like(x) > 0.5).float()
    for A, Ainv, Omega in [edit.colorization_ops(x), edit.superres_ops(x, 4), edit.superres_ops(x, 2),
                           edit.identity_ops(masks)]:
        assert rel(Ainv(A(x)), x) < 1e-6 and rel(A(Ainv(A(x))), A(x)) < 1e-6
        # an edit keeps A(y)(1 - Omega) exactly, whatever the network does
        y = x[:1]
        F = lambda u, t: torch.randn_like(u)                       # any network
        out = edit.edit(F, y, A, Ainv, Omega[:1], [1.2, 0.5], clamp=False)
        assert (A(out) * (1 - Omega[:1]) - A(y) * (1 - Omega[:1])).abs().max() < 1e-5
        assert (A(out) * Omega[:1]).abs().max() > 1e-3
    # colorization keeps the luminance; super-resolution keeps every patch mean
    A, Ainv, Omega = edit.colorization_ops(x)
    out = edit.edit(lambda u, t: torch.randn_like(u), x, A, Ainv, Omega, [1.0], clamp=False)
    lum = lambda v: (v * torch.tensor(edit.GRAY).view(1, 3, 1, 1)).sum(1)
    assert (lum(out) - lum(x)).abs().max() < 1e-5
    A, Ainv, Omega = edit.superres_ops(x, 4)
    out = edit.edit(lambda u, t: torch.randn_like(u), x, A, Ainv, Omega, [1.0], clamp=False)
    pool = torch.nn.functional.avg_pool2d
    assert (pool(out, 4) - pool(x, 4)).abs().max() < 1e-5


def test_slerp_endpoints():
    import edit
    z1, z2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(edit.slerp(z1, z2, 0.0), z1, atol=1e-5)
    assert torch.allclose(edit.slerp(z1, z2, 1.0), z2, atol=1e-5)


def test_sharded_sampling_reproduces_single_process(tiny_teacher, image_folder, tmp_path):
    run_script('train_sct.py', '--preset', 'fashion-s', '--data', image_folder, *TINY, '--teacher', tiny_teacher,
               '--out', tmp_path / 'sct', '--steps', 2)
    ckpt = tmp_path / 'sct' / 'checkpoint.pt'
    run_script('sample.py', ckpt, '--steps', 2, '--num', 10, '--batch', 3, '--npz', tmp_path / 'one.npz')
    run_script('sample.py', ckpt, '--steps', 2, '-n', 10, '--batch', 4, '--npz', tmp_path / 'two.npz', nproc=2)
    one, two = np.load(tmp_path / 'one.npz')['samples'], np.load(tmp_path / 'two.npz')['samples']
    assert one.shape == (10, 16, 16, 1) and np.array_equal(one, two)
    run_script('sample.py', tiny_teacher, '--num', 4, '--grid', tmp_path / 'teacher.png')
    assert os.path.exists(tmp_path / 'teacher.png')


# ---------------------------------------------------------------------------------------------------------------
# fid.py: the Frechet distance against references computed other ways, the preprocessing, and feature parity with
# the TorchScript FID Inception (skipped when the shared data folder does not hold it).

import fid  # noqa: E402
import inception  # noqa: E402

INCEPTION_TS = os.path.join(SHARED_DATA, 'inception', inception.TORCHSCRIPT_NAME)


@pytest.fixture
def single_thread():
    """Small LAPACK calls run faster on one thread, and far faster than on two when another process keeps the
    cores busy (OpenMP threads then wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fd_reference(mu1, s1, mu2, s2, tr_sqrt):
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def _denman_beavers_sqrt(A, iters=50):
    """Principal square root of a matrix with positive eigenvalues (Denman & Beavers 1976)."""
    Y, Z = A.clone(), torch.eye(len(A), dtype=A.dtype)
    for _ in range(iters):
        Y, Z = (Y + torch.linalg.inv(Z)) / 2, (Z + torch.linalg.inv(Y)) / 2
    return Y


def test_frechet_full_rank_matches_denman_beavers(single_thread):
    g = torch.Generator().manual_seed(0)
    d = 64
    X, Y = (torch.randn(d, 200, generator=g, dtype=torch.float64) / 200 ** 0.5 for _ in range(2))
    s1, s2 = X @ X.T + 0.1 * torch.eye(d, dtype=torch.float64), Y @ Y.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    ref = _fd_reference(mu1, s1, mu2, s2, _denman_beavers_sqrt(s1 @ s2).trace())
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)
    assert fid.frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(ref, rel=1e-10)


def test_frechet_rank_deficient_matches_nuclear_norm(single_thread):
    """S1 = X X^T, S2 = Y Y^T of low rank: tr (S1 S2)^(1/2) is the sum of the singular values of X^T Y."""
    g = torch.Generator().manual_seed(1)
    for d, r1, r2 in [(64, 20, 30), (64, 64, 5), (256, 40, 40)]:
        X = torch.randn(d, r1, generator=g, dtype=torch.float64) / r1 ** 0.5
        Y = torch.randn(d, r2, generator=g, dtype=torch.float64) / r2 ** 0.5
        mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        s1, s2 = X @ X.T, Y @ Y.T
        ref = _fd_reference(mu1, s1, mu2, s2, torch.linalg.svdvals(X.T @ Y).sum())
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10, abs=1e-9)


def test_frechet_closed_forms_and_self_distance(single_thread):
    d = 64
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    assert fid.frechet_distance(mu1, eye, mu2, 4 * eye) == pytest.approx(float(((mu1 - mu2) ** 2).sum()) + d, rel=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.rand(d, generator=g, dtype=torch.float64), torch.rand(d, generator=g, dtype=torch.float64)
    a[:20], b[10:40] = 0, 0
    got = fid.frechet_distance(mu1, Q @ torch.diag(a) @ Q.T, mu1, Q @ torch.diag(b) @ Q.T)
    assert got == pytest.approx(float(((a.sqrt() - b.sqrt()) ** 2).sum()), rel=1e-10, abs=1e-10)
    feats = np.random.default_rng(0).standard_normal((100, 512)) * 0.5 + 0.3
    mu, sigma = fid.stats(feats)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (512, 512)
    assert np.allclose(sigma, np.cov(feats.T)) and abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_inception_input_shapes_and_range(single_thread):
    gray = torch.zeros(2, 28, 28, 1, dtype=torch.uint8)
    gray[1] = 255
    x = fid.inception_input(gray)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(127 / 128))  # (x-128)/128
    rgb = np.random.default_rng(0).integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)
    x = fid.inception_input(rgb)
    assert x.shape == (3, 3, 299, 299) and x.min() >= -1 and x.max() <= 127 / 128
    g = fid.inception_input(rgb[..., :1])
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 0], g[:, 2])
    big = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8))
    assert torch.equal(fid.inception_input(big), (big.permute(0, 3, 1, 2).float() - 128) / 128)
    for bad in (torch.zeros(1, 28, 28, 1), torch.zeros(1, 3, 28, 28, dtype=torch.uint8)):
        with pytest.raises(ValueError):
            fid.inception_input(bad)


def test_fid_inception_shapes_without_weights(single_thread):
    net = inception.FIDInception().eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 299, 299)).shape == (1, 2048)
    assert sum(p.numel() for p in net.parameters()) == 21_768_352


@pytest.mark.skipif(not os.path.isfile(INCEPTION_TS), reason=f'no FID Inception TorchScript at {INCEPTION_TS} '
                    '(set SCM_DATA to the folder holding inception/)')
def test_fid_inception_matches_torchscript(tmp_path, single_thread):
    net = inception.load_inception(INCEPTION_TS)
    ts = torch.jit.load(INCEPTION_TS, map_location='cpu').eval()
    try:
        images = data.load_dataset('fashion-mnist', SHARED_DATA, 'test', download=False).images[:2]
        images = images.permute(0, 2, 3, 1).numpy()
    except data.DataError:
        images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    noise = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        for imgs in (noise, images):
            x = fid.inception_input(imgs)
            ours, ref = net(x), ts(x)
            assert ours.shape == ref.shape == (len(imgs), 2048)
            assert (ours - ref).abs().max() <= 1e-4
    feats = fid.features_of(images, net, batch=1, progress=False)
    assert feats.dtype == np.float64 and np.abs(feats - ref.double().numpy()).max() <= 1e-4
    sd = dict(net.state_dict())                  # pytorch-fid's .pth layout loads to the same weights
    for k in [k for k in sd if k.endswith('bn.bias')]:
        sd[k.replace('bn.bias', 'bn.weight')] = torch.ones_like(sd[k])
        sd[k.replace('bn.bias', 'bn.num_batches_tracked')] = torch.tensor(0)
    sd['fc.weight'], sd['fc.bias'] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(sd, tmp_path / inception.PTH_NAME)
    other = inception.load_inception(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


def test_fid_refuses_bad_counts_and_warns_on_unknown_statistics(tmp_path):
    np.savez(tmp_path / 'empty.npz', samples=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / 'a.npz', mu=np.zeros(4), sigma=np.eye(4), preprocess=np.array(fid.PREPROCESS))
    np.savez(tmp_path / 'b.npz', mu=np.ones(4), sigma=np.eye(4))                       # pytorch-fid's: no tag
    for args, match in [(['stats', tmp_path / 'empty.npz', '--out', tmp_path / 's.npz'], 'fewer than 2'),
                        (['stats', tmp_path / 'empty.npz', '-n', -5, '--out', tmp_path / 's.npz'], 'at least 1')]:
        p = run_script('fid.py', *args, check=False)
        assert p.returncode == 2 and match in p.stderr.strip().splitlines()[-1], p.stderr[-1500:]
    p = run_script('fid.py', 'fid', tmp_path / 'a.npz', tmp_path / 'b.npz')
    assert p.stdout.strip() == '4.0000' and 'warning: statistics made with different or unknown' in p.stderr


def test_fid_reads_each_image_of_a_folder_in_its_own_colours(tmp_path):
    """pytorch-fid converts every image to RGB on its own; a grayscale first image must not make the folder gray."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(colour):
        _png(tmp_path / 'mixed' / f'{i + 1}.png', a)
        _png(tmp_path / 'rgb' / f'{i + 1}.png', a)
    _png(tmp_path / 'mixed' / '0.png', colour[0, :, :, 0])                             # gray, sorted first
    mixed, rgb = fid.load_images(tmp_path / 'mixed'), fid.load_images(tmp_path / 'rgb')
    assert mixed.shape == (4, 8, 8, 3) and np.array_equal(mixed[1:], rgb)
    assert np.array_equal(mixed[0], np.repeat(colour[0, :, :, :1], 3, axis=2))


# ---------------------------------------------------------------------------------------------------------------
# The offline demo (demo.py): a 2-D Gaussian mixture with an exact TrigFlow teacher.


def test_offline_demo_quick(tmp_path):
    """demo.py --quick runs every path (sCD against the exact teacher, sCT from data, 1- and 2-step, the PNG); trained
    students are far closer to the mixture than the untrained network and than pure noise."""
    import demo
    d = demo.run(quick=True, out=str(tmp_path / 'demo.png'))
    assert all(math.isfinite(v) for v in d.values()), d
    assert d['data'] < d['teacher ODE (35 NFE)'] < d['noise N(0, sigma_d^2 I)'], d
    for k in ('sCD 1-step', 'sCD 2-step', 'sCT 1-step', 'sCT 2-step'):
        assert d[k] < 0.1 * d['untrained 1-step'] and d[k] < 0.8 * d['noise N(0, sigma_d^2 I)'], (k, d)
    assert os.path.getsize(tmp_path / 'demo.png') > 1000


def test_bench_runs_every_kind():
    """bench.py at a toy size: every row (one pass, two passes, the stock network) with a time and a peak memory,
    under the glibc settings it restarts itself with."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--sizes', 'fashion-s', 'stock-dit-tiny',
                        '--batch', '2', '--rounds', '1'], env=dict(os.environ, OMP_NUM_THREADS='1'),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'glibc keeping freed memory' in p.stdout, p.stdout
    import bench
    unet, stock = p.stdout.split('stock-dit-tiny: StockDiT')
    for kinds, out in ((bench.KINDS, unet), (bench.STOCK_KINDS, stock)):
        for kind in kinds:
            row = re.search(rf'^  {re.escape(kind)} +([0-9.]+) +([0-9.]+) +[0-9.]+ +(-?[0-9.]+) ', out, re.M)
            assert row and float(row[1]) > 0, (kind, p.stdout)
    assert re.search(r'sCD / sCD 2-pass [0-9.]+ \(rounds [0-9. ]+\), sCD / sCD 2-pass stock [0-9.]+', stock), stock


def test_plot_hero_puts_the_grids_side_by_side(tmp_path):
    """plot.py hero (pillow only): the three grids side by side under captions."""
    import plot
    for i, name in enumerate(('teacher-heun35', 'scd-1step', 'scd-2step')):
        Image.new('RGB', (30, 20), (80 * i, 0, 0)).save(tmp_path / f'{name}.png')
    plot.hero(str(tmp_path), str(tmp_path / 'hero.png'))
    hero = Image.open(tmp_path / 'hero.png')
    assert hero.size == (3 * (30 + 8) + 8, 20 + 20 + 8)
    assert hero.getpixel((8 + 2 * 38 + 5, 30)) == (160, 0, 0)          # the third grid, in its place


def test_plot_curve_and_tmid_from_reproduce_outputs(tmp_path):
    """plot.py curve and tmid (matplotlib, optional) read reproduce.sh's text files and write PNGs atomically; a
    missing input is one error line."""
    pytest.importorskip('matplotlib', reason='plot.py curve and tmid need matplotlib (optional)')
    import plot
    (tmp_path / 'curve.txt').write_text('teacher 3000 35 65.0\nscd 500 1 100.0\nscd 500 2 75.0\nscd 1000 2 74.0\n')
    (tmp_path / 'tmid.txt').write_text('1.1 74.0\n0.8 71.0\n')
    plot.curve(str(tmp_path / 'curve.txt'), str(tmp_path / 'curve.png'))
    plot.tmid(str(tmp_path / 'tmid.txt'), str(tmp_path / 'curve.txt'), str(tmp_path / 'tmid.png'))
    assert Image.open(tmp_path / 'curve.png').size[0] > 300 and Image.open(tmp_path / 'tmid.png').size[0] > 300
    assert sorted(os.listdir(tmp_path)) == ['curve.png', 'curve.txt', 'tmid.png', 'tmid.txt']
    with pytest.raises(SystemExit, match='error: cannot read'):
        plot.tmid(str(tmp_path / 'missing.txt'), str(tmp_path / 'curve.txt'), str(tmp_path / 'x.png'))


# ---------------------------------------------------------------------------------------------------------------
# Files a user hands us (issue 31): no code runs, no crash, no hang, no memory blow-up, no silent corruption, and
# every refusal is one `error:` line with exit 2, before any work (no run folder, no output file).

def refused(script, *args, match, env=None, forbid=(), seconds=90, mb=1000):
    """Run script on a hostile input: exit 2, stderr exactly one line, an `error:` line holding `match`, within
    `seconds` and `mb` MB of peak memory (the script's own VmHWM), and none of the paths in `forbid` exists."""
    import tempfile
    import threading
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', **(env or {}))
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        t0 = time.time()
        hwm = tempfile.NamedTemporaryFile(delete=False)
        # the script as __main__, its peak resident set (VmHWM: this process's own, not the forking parent's) at exit
        run = ('import atexit, runpy, sys; sys.path.insert(0, sys.argv[1]); f = sys.argv[2]; '
               'atexit.register(lambda: open(f, "w").write(next(l.split()[1] for l in '
               'open("/proc/self/status") if l.startswith("VmHWM")))); '
               'sys.argv = sys.argv[3:]; runpy.run_path(sys.argv[0], run_name="__main__")')
        p = subprocess.Popen([sys.executable, '-c', run, ROOT, hwm.name, os.path.join(ROOT, script),
                              *map(str, args)], stdout=out, stderr=err, cwd=ROOT, env=env)
        killer = threading.Timer(seconds, p.kill)
        killer.start()
        p.wait()
        killer.cancel()
        err.seek(0)
        out.seek(0)
        stderr, stdout = err.read().decode(errors='replace'), out.read().decode(errors='replace')
        peak_mb = int(open(hwm.name).read() or 0) / 1024
        os.remove(hwm.name)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (script, args, p.returncode, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error:') and match in lines[0], lines
    assert time.time() - t0 < seconds and 0 < peak_mb < mb, (time.time() - t0, peak_mb)
    for path in forbid:
        assert not os.path.exists(path), path
    return lines[0], stdout


def _pickle_file(path, obj, protocol=2):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


class _ForgedDType:
    """numpy.dtype('f4') whose BUILD state makes it a structured dtype with forged flags (0x3f: 'holds objects'):
    numpy's own __setstate__ then reads the array's bytes as object pointers (a segfault in the unpickler of old)."""

    def __reduce__(self):
        return np.dtype, ('f4', False, True), (3, '|', None, ('a',), {'a': (np.dtype('f8'), 0)}, 8, 1, 0x3f)


class _ScriptRuns(torch.nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) prints a marker: code a weights file carries."""

    def __init__(self):
        super().__init__()
        self.tag = 'x'

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.tag, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        self.tag, self.training = state[0], state[1]
        print('THE-ARCHIVE-RAN-CODE')


def test_inception_weights_never_run_code(image_folder, tmp_path):
    """A TorchScript archive as the Inception weights (by --inception, or under the TorchScript's own file name in
    $SCM_DATA/inception/) is refused unread: its __setstate__ never runs, no statistics are written. The control:
    torch.jit.load of the same file does run it."""
    outer = torch.nn.Module()
    outer.inner = _ScriptRuns()
    evil = tmp_path / 'data' / 'inception' / inception.TORCHSCRIPT_NAME
    evil.parent.mkdir(parents=True)
    torch.jit.save(torch.jit.script(outer), evil)
    control = subprocess.run([sys.executable, '-c', f'import torch; torch.jit.load({str(evil)!r})'],
                             capture_output=True, text=True)
    assert 'THE-ARCHIVE-RAN-CODE' in control.stdout                   # what loading it the old way did
    for args, env in [(['--inception', evil], None), ([], dict(SCM_DATA=str(tmp_path / 'data')))]:
        _, stdout = refused('fid.py', 'stats', image_folder, '--out', tmp_path / 's.npz', *args, env=env,
                            match='refused unread', forbid=[tmp_path / 's.npz'])
        assert 'THE-ARCHIVE-RAN-CODE' not in stdout
    with pytest.raises(inception.WeightsError, match='refused unread'):
        inception.load_inception(evil)


def _scd(image_folder, out, *args):
    return ['--preset', 'fashion-s', '--data', image_folder, *TINY, '--out', out, '--steps', 1, *args]


def test_foreign_pickles_are_plain_data_or_one_line(image_folder, tmp_path):
    """EDM/EDM2 pickles and CIFAR-10 batches through safe_pickle: a dtype with forged flags (a segfault before), a
    graph of modules sharing a node at each of 16 levels (2^16 paths; 2^64 at 64 levels before) and a cycle (a
    RecursionError), lists nested 200 deep, a 9-byte memo bomb (2.4 GB in the C unpickler), an object array, a protocol-5
    bytearray: each one `error:` line, no run folder, within seconds and 1 GB."""
    import safe_pickle
    out = tmp_path / 'run'
    chain = torch.nn.ModuleDict()
    for _ in range(16):                                  # 2^16 paths to the leaf, 16 modules in the file
        node = torch.nn.ModuleDict()
        node._modules.update(a=chain, b=chain)
        chain = node
    cycle = torch.nn.ModuleDict()
    cycle._modules['me'] = cycle
    deep = []
    for _ in range(200):
        deep = [deep]
    cases = {
        'deep.pkl': (dict(ema=deep), 'nested more than'),
        'dtype.pkl': (dict(ema=_ForgedDType()), "not a plain numeric dtype's"),
        'dag.pkl': (dict(ema=chain), 'reached twice'),
        'cycle.pkl': (dict(ema=cycle), 'reached twice'),
        'objects.pkl': (dict(ema=np.array([object(), 1], dtype=object)), 'only plain numeric dtypes'),
    }
    for name, (obj, match) in cases.items():
        try:
            _pickle_file(tmp_path / name, obj, protocol=4)
        except (pickle.PicklingError, TypeError):
            obj = dict(ema=np.array([1.5, 1], dtype=object))            # object() itself does not pickle
            _pickle_file(tmp_path / name, obj)
        refused('train_scd.py', *_scd(image_folder, out, '--s-max', 1, '--teacher', tmp_path / name), match=match,
                forbid=[out])
    (tmp_path / 'memo.pkl').write_bytes(b'\x80\x02Nr\xf0\xff\xff\xff.')   # LONG_BINPUT 4294967280: 9 bytes
    refused('train_scd.py', *_scd(image_folder, out, '--s-max', 1, '--teacher', tmp_path / 'memo.pkl'),
            match='memo index', forbid=[out], mb=600)
    (tmp_path / 'ba.pkl').write_bytes(b'\x80\x05\x96' + (2 ** 40).to_bytes(8, 'little') + b'.')
    with pytest.raises(safe_pickle.ReadError, match='bytearray'):
        safe_pickle.read_pickle_file(tmp_path / 'ba.pkl', 'x', {})
    refused('train_teacher.py', '--preset', 'fashion-s', '--data', image_folder, *TINY[:-2], '--out', out,
            '--init', tmp_path / 'dag.pkl', match='reached twice', forbid=[out])
    # CIFAR-10 batches: the forged dtype, a list, strings for labels: one line each, in process and on the CLI
    import tarfile
    for name, batch in [('dtype', {b'data': _ForgedDType(), b'labels': [0]}), ('list', [1, 2, 3]),
                        ('labels', {b'data': np.zeros((2, 3072), np.uint8), b'labels': ['a', 'b']})]:
        folder = tmp_path / f'cifar-{name}'
        folder.mkdir()
        raw = pickle.dumps(batch, protocol=2)
        with tarfile.open(folder / 'cifar-10-python.tar.gz', 'w:gz') as tar:
            for member in ['test_batch'] + [f'data_batch_{k}' for k in range(1, 6)]:
                info = tarfile.TarInfo(f'cifar-10-batches-py/{member}')
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        with pytest.raises(data.DataError, match='cifar-10-batches-py'):
            data.load_dataset('cifar10', str(folder), 'test', download=False)
        refused('train_teacher.py', '--preset', 'fashion-s', '--data', 'cifar10', '--data-dir', folder, *TINY[:-2],
                '--out', out, match='cifar-10-batches-py', forbid=[out])


def _flip(src, dst, member_suffix, nbytes=4096):
    """Copy a torch.save zip with nbytes flipped inside the record whose name ends with member_suffix."""
    raw = bytearray(open(src, 'rb').read())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    n = min(nbytes, info.file_size)
    raw[start:start + n] = bytes(b ^ 0xff for b in raw[start:start + n])
    open(dst, 'wb').write(bytes(raw))


def test_corrupted_and_malformed_checkpoints_get_one_line(image_folder, tiny_teacher, tmp_path):
    """A checkpoint with 4 KB flipped inside a tensor (torch.load reads it silently) is refused by its CRC on every
    entry point; a stride-0 EMA tensor standing for 34 GB, model_kwargs of a 5B network with tiny weights, EMA
    weights of ints or a list, an unknown arch, keyword or method, a tensor of the wrong shape: one line each,
    nothing allocated beyond the file's size, no output."""
    shipped = os.path.join(ROOT, 'checkpoints', 'teacher-fashion-s.pt')
    with zipfile.ZipFile(shipped) as z:
        big = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size).filename
    _flip(shipped, tmp_path / 'flipped.pt', big)
    assert torch.load(tmp_path / 'flipped.pt', weights_only=True)['ema']          # what torch alone does: loads
    out = tmp_path / 'run'
    for script, args in [('sample.py', [tmp_path / 'flipped.pt', '--grid', tmp_path / 'g.png']),
                         ('checkpoint.py', ['export', tmp_path / 'flipped.pt', tmp_path / 'e.pt']),
                         ('train_sct.py', ['--preset', 'fashion-s', '--data', image_folder, '--out', out, '--steps', 1,
                                           '--teacher', tmp_path / 'flipped.pt']),
                         ('train_scd.py', _scd(image_folder, out, '--s-max', 1, '--teacher', tiny_teacher,
                                               '--student', tmp_path / 'flipped.pt'))]:
        refused(script, *args, match='CRC', forbid=[out, tmp_path / 'g.png', tmp_path / 'e.pt'])
    good = _ckpt(tiny_teacher)
    kw = good['model_kwargs']
    first = next(iter(good['ema']))
    bad = {
        'stride0': (dict(good, ema=dict(good['ema'], **{first: torch.zeros(1).expand(2 ** 33)})), 'overlap'),
        'huge': (dict(good, model_kwargs=dict(kw, model_channels=60000)), 'over the limit'),
        'ints': (dict(good, ema={k: v.long() for k, v in good['ema'].items()}), 'floating-point tensors'),
        'list': (dict(good, ema=list(good['ema'].values())), 'floating-point tensors'),
        'arch': (dict(good, model_kwargs=dict(kw, arch='mlp')), 'model_kwargs'),
        'keyword': (dict(good, model_kwargs=dict(kw, wings=2)), 'build no network'),
        'method': (dict(good, method='gan'), "method 'gan'"),
        'shape': (dict(good, ema=dict(good['ema'], **{first: torch.zeros(3, 3)})), 'do not fit'),
    }
    for name, (ckpt, match) in bad.items():
        torch.save(ckpt, tmp_path / f'{name}.pt')
        refused('sample.py', tmp_path / f'{name}.pt', '--grid', tmp_path / 'g.png', match=match,
                forbid=[tmp_path / 'g.png'])
        refused('train_scd.py', *_scd(image_folder, out, '--s-max', 1, '--teacher', tmp_path / f'{name}.pt'),
                match=match, forbid=[out])


def test_flags_that_would_be_ignored_or_wrong_get_one_line(image_folder, tiny_teacher, tmp_path):
    """--vsd negative or not finite; --guide-net that --s-max 1 would ignore; sample.py --sigmas with the Heun
    sampler (it would ignore them): one line each, before any run folder or output exists."""
    out = tmp_path / 'run'
    for v in ('-1', 'nan', 'inf'):
        refused('train_scd.py', *_scd(image_folder, out, '--s-max', 1, '--teacher', tiny_teacher, '--vsd', v),
                match='--vsd', forbid=[out])
    refused('train_scd.py', *_scd(image_folder, out, '--s-max', 1, '--teacher', tiny_teacher, '--guide-net',
                                  tiny_teacher), match='--guide-net', forbid=[out])
    student = tmp_path / 'student'
    run_script('train_scd.py', *_scd(image_folder, student, '--s-max', 1, '--teacher', tiny_teacher))
    refused('sample.py', student / 'checkpoint.pt', '--sigmas', 80, 1, '--sampler', 'heun', '--grid',
            tmp_path / 'g.png', match='--sampler heun', forbid=[tmp_path / 'g.png'])


# ---------------------------------------------------------------------------------------------------------------
# Issue 33's guard: restructuring the training scripts changes no number.

LOSS_RUNS = {   # method -> the script and flags; every run: fashion-s, batch 8, seed 0, 3 steps, the -v1 checkpoints
    'teacher': ['train_teacher.py', '--preset', 'fashion-s'],
    'scd': ['train_scd.py', '--preset', 'fashion-s', '--teacher', '{T}'],
    'scd-vsd': ['train_scd.py', '--preset', 'fashion-s-vsd', '--teacher', '{T}', '--student', '{S}', '--vsd', '1'],
    'sct': ['train_sct.py', '--preset', 'fashion-s', '--teacher', '{T}'],
    'dscd': ['train_scd.py', '--preset', 'fashion-s', '--teacher', '{T}', '--discrete', '64'],
    'cd2023': ['train_scd.py', '--preset', 'fashion-s', '--teacher', '{T}', '--recipe', 'cd2023'],
    'ct2023': ['train_sct.py', '--preset', 'fashion-s', '--teacher', '{T}', '--recipe', 'ct2023'],
    'ict': ['train_sct.py', '--preset', 'fashion-s', '--teacher', '{T}', '--recipe', 'ict'],
}


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, 'fashion-mnist')),
                    reason=f'no Fashion-MNIST at {SHARED_DATA} (set SCM_DATA)')
@pytest.mark.parametrize('method', list(LOSS_RUNS))
def test_first_steps_keep_their_recorded_losses(method, tmp_path):
    """The first 3 steps of each method (log.jsonl: the loss, its terms, the gradient norms) equal those recorded
    before the training scripts were restructured (test_scm_losses.json, written by the same runs), to rounding.
    scd-vsd was recorded again when F_phi began to score in eval mode and see s (a change of the method, not of the
    code's shape)."""
    ckpts = dict(T=os.path.join(ROOT, 'checkpoints', 'teacher-fashion-s-v1.pt'),   # the files they were recorded with
                 S=os.path.join(ROOT, 'checkpoints', 'scd-fashion-s-v1.pt'))
    script, *flags = [a.format(**ckpts) for a in LOSS_RUNS[method]]
    run_script(script, *flags, '--batch', 8, '--steps', 3, '--log-every', 1, '--sample-every', 0, '--seed', 0,
               '--data-dir', SHARED_DATA, '--out', tmp_path / 'run')
    got = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    want = json.load(open(os.path.join(ROOT, 'test_scm_losses.json')))[method]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert set(w) <= set(g), (sorted(w), sorted(g))
        for k, v in w.items():
            assert g[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (method, g['step'], k, g[k], v)


def test_edm_pickles_of_another_form_get_one_line():
    """EDM pickle records whose constructor arguments are missing or of another type, an ADM network and a
    sigma_data mismatch: each one line that says which (tracebacks and misleading lines before)."""
    import edm_pickle

    def precond(pre=None, **unet):
        child = edm_pickle.Persistent(dict(type='class', class_name='SongUNet', state=dict(_init_kwargs=unet)))
        return edm_pickle.Persistent(dict(type='class', class_name='EDMPrecond', state=dict(
            _init_kwargs=dict(dict(model_type='SongUNet'), **(pre or {})), _modules=dict(model=child))))
    song = dict(img_resolution=16, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8])
    for obj, match in [(precond(**{k: v for k, v in song.items() if k != 'in_channels'}), "KeyError: 'in_channels'"),
                       (precond(**dict(song, channel_mult=2)), 'not of the form EDM/EDM2 write'),
                       (precond(dict(model_type='DhariwalUNet'), **song), 'DhariwalUNet; this converts'),
                       (precond(dict(sigma_data=0.6), **song), 'sigma_data 0.6; TrigFlow here needs 0.5'),
                       (precond(**dict(song, out_channels=2)), 'in_channels 1 and out_channels 2 differ')]:
        with pytest.raises(cli.UserError, match=re.escape(match)) as e:
            edm_pickle.convert(obj, 'x.pkl')
        assert '\n' not in str(e.value) and 'embedding_type' not in str(e.value)


def test_a_checkpoint_from_before_the_attention_fix_says_so_once(tmp_path):
    """scd-fashion-s-v1.pt predates the U-Net attention fix: it samples as trained, with one note line saying so;
    the shipped teacher (teacher-fashion-s.pt, retrained after the fix) has EDM2's attention and prints none."""
    old = run_script('sample.py', os.path.join(ROOT, 'checkpoints', 'scd-fashion-s-v1.pt'), '-n', 2, '--grid',
                     tmp_path / 'a.png')
    notes = [line for line in old.stderr.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and 'predates the U-Net attention fix' in notes[0] and os.path.exists(tmp_path / 'a.png')
    new = run_script('sample.py', os.path.join(ROOT, 'checkpoints', 'teacher-fashion-s.pt'), '-n', 2,
                     '--heun-steps', 2, '--grid', tmp_path / 'b.png')
    assert 'predates' not in new.stderr and torch.load(os.path.join(ROOT, 'checkpoints', 'teacher-fashion-s.pt'),
                                                      weights_only=True)['model_kwargs']['attention_axis'] == 'pixels'
