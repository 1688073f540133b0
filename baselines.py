"""The discrete-time consistency models sCM measures itself against, as published, beside sCM's own code: dsCD and
dsCT (sCM App. E: sCM's loss with a finite-difference tangent), CD and CT (Consistency Models, Song et al. 2023) and
iCT (Song & Dhariwal 2024): their grids, schedules and curricula, metric, losses, recipe rows and their flags'
checks. trigflow.py is sCM alone; this file imports it.
"""
import math

import torch

import trigflow as tf
from cli import UserError


# ---------------------------------------------------------------------------------------------------------------
# dsCD and dsCT (App. E): sCM's loss with a finite-difference tangent on a grid of N steps.


def discrete_times(N, sigma_d=tf.SIGMA_D, rho=7.0):
    """Karras et al.'s grid of N steps in TrigFlow time: dsCD's (App. E) and, with N - 1, CM 2023's grid of N times
    (its §5 and App. C: rho = 7 from eps = 0.002 to T = 80): sigma_i = (sigma_min^(1/rho) + i/N (sigma_max^(1/rho) -
    sigma_min^(1/rho)))^rho, i = 0..N, t_i = arctan(sigma_i / sigma_d), t_0 replaced by 0, where TrigFlow's f(x, 0) = x
    is exact. Returns [N + 1] ascending times."""
    i = torch.arange(N + 1, dtype=torch.float64)
    sigma = (tf.SIGMA_MIN ** (1 / rho) + i / N * (tf.SIGMA_MAX ** (1 / rho) - tf.SIGMA_MIN ** (1 / rho))) ** rho
    ts = torch.atan(sigma / sigma_d)
    ts[0] = 0.0
    return ts.float()


@torch.no_grad()
def dscd_tangent(F, x_t, t, dxdt, dt, r=1.0, sigma_d=tf.SIGMA_D, F_minus=None):
    """F_minus = F(x_t/sigma_d, t) and the finite-difference tangent of Eq. 37 between t and t' = t - dt, times cos(t)
    (the same scale as scm_tangent's g; it converges to it as dt -> 0). x_t' is one DDIM step (Eq. 26) along dxdt;
    for sCT's dxdt that step is exact (x_t' shares z). dt: a number or [B]. Both F evaluations see one dropout mask.
    F_minus: F(x_t/sigma_d, t) if the caller has it (scm_loss); then the RNG must be where that forward began."""
    t, x_t, dxdt = tf._wide(t), tf._wide(x_t), tf._wide(dxdt)
    dt = tf._bc(torch.as_tensor(dt, dtype=x_t.dtype, device=x_t.device), x_t)
    t_prev = t - dt.flatten()
    cos, cos_p, sin_p = tf._bc(t.cos(), x_t), tf._bc(t_prev.cos(), x_t), tf._bc(t_prev.sin(), x_t)
    x_prev = dt.cos() * x_t - dt.sin() * dxdt                                # DDIM step t -> t' (Eq. 26)
    if F_minus is None:
        with tf._same_rng(x_t.device):
            F_minus = tf._wide(F(x_t / sigma_d, t))
    F_minus = tf._wide(F_minus)
    F_prev = tf._wide(F(x_prev / sigma_d, t_prev))
    # Eq. 37: Delta = [f(x_t, t) - f(x_t', t')] / sin(t - t'), rearranged so no large terms cancel
    delta = (-cos_p * (sigma_d * F_minus - dxdt)
             - r * sin_p * (x_t + sigma_d * (dt.cos() * F_minus - F_prev) / dt.sin()))
    return F_minus, cos * delta


def dscd_loss(F, x_t, t, dxdt, dt, **kw):
    """dsCD / dsCT (App. E): trigflow.scm_loss with the finite-difference tangent dscd_tangent between t and t - dt
    instead of the JVP's; the same F_theta forward gives both (one dropout mask). kw: scm_loss's."""
    def tangent(F, x_t, t, dxdt, r, F_theta):
        return dscd_tangent(F, x_t, t, dxdt, dt, r=r, sigma_d=kw.get('sigma_d', tf.SIGMA_D), F_minus=F_theta)[1]
    kw.pop('jvp', None)
    kw.pop('two_pass', None)
    return tf.scm_loss(F, x_t, t, dxdt, tangent=tangent, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The discrete-time family sCM compares against: Consistency Models (CM 2023, Song et al.: CD and CT) and iCT (Song &
# Dhariwal 2024). Written in TrigFlow time: f = cos(t) x_t - sin(t) sigma_d F, whose boundary f(x, 0) = x is exact at
# t = 0, where CM's parameterization puts it at sigma = eps = 0.002; EDM's sigma is sigma_d tan(t) (App. B.2).


def pseudo_huber(x, y, c=None):
    """iCT's metric (§3.3): sqrt(||x - y||^2 + c^2) - c per sample, c = 0.00054 sqrt(d) by default (d = elements per
    sample). ~ ||x - y||^2 / (2c) for small differences, ~ ||x - y|| for large ones. Returns [B]."""
    diff = (tf._wide(x) - tf._wide(y)).flatten(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return (diff.square().sum(1) + c * c).sqrt() - c


def ict_num_steps(k, K, s0=10, s1=1280):
    """iCT's discretization curriculum (§3.4, Eq. 7): N(k) = min(s0 2^floor(k / K'), s1) + 1 grid points at training
    step k of K, K' = floor(K / (log2(s1 / s0) + 1)): N doubles every K' steps from s0 + 1 to s1 + 1."""
    K_prime = max(1, math.floor(K / (math.log2(s1 // s0) + 1)))                  # >= 1 for runs of < 8 steps
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def cm2023_schedule(k, K, s0=2, s1=150, mu0=0.9):
    """CM 2023's schedules (App. C): N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 grid points and the
    target EMA rate mu(k) = exp(s0 log(mu0) / N(k)). Returns (N, mu). Defaults: CT on CIFAR-10 (its Table 3)."""
    N = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
    return N, math.exp(s0 * math.log(mu0) / N)


def ict_interval_probs(sigmas, P_mean=-1.1, P_std=2.0):
    """iCT's distribution over the intervals [sigma_i, sigma_{i+1}] of an ascending grid (§3.5): the mass a log-normal
    log(sigma) ~ N(P_mean, P_std^2) puts on each, erf((log sigma_{i+1} - P_mean) / (sqrt 2 P_std)) -
    erf((log sigma_i - P_mean) / (sqrt 2 P_std)), normalized. Returns [len(sigmas) - 1]."""
    cdf = torch.erf((torch.as_tensor(sigmas, dtype=torch.float64).log() - P_mean) / (math.sqrt(2) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def sample_interval(n, ts, P_mean=None, P_std=None, sigma_d=tf.SIGMA_D, device=None, generator=None):
    """An interval (t_i, t_{i+1}) of the grid ts for each of n samples: uniform over the N - 1 (CM 2023, Alg. 2-3),
    or with P_mean and P_std iCT's discretized log-normal (ict_interval_probs). Returns (t, t_prev) = (t_{i+1}, t_i)."""
    if P_std is None:
        p = torch.ones(len(ts) - 1, dtype=torch.float64)
    else:
        p = ict_interval_probs(sigma_d * ts.double().tan(), P_mean, P_std)
    i = torch.multinomial(p.float(), n, replacement=True, generator=generator)
    return ts[i + 1].to(device), ts[i].to(device)


@torch.no_grad()
def heun_step(F, x_t, t, t_prev, sigma_d=tf.SIGMA_D):
    """One step of the PF-ODE of F from t to t_prev < t ([B] each) by EDM's Heun (Karras et al. 2022, Alg. 1 lines
    5-8, in x_sigma = x_t / cos t; Euler where t_prev = 0): CD's x_{t_n} from x_{t_{n+1}} (CM 2023 Alg. 2; Heun, as its
    Table 3). Returns x_{t_prev}."""
    t, t_prev, x_t = tf._wide(t), tf._wide(t_prev), tf._wide(x_t)
    sigma, sigma_p = tf._bc(sigma_d * t.tan(), x_t), tf._bc(sigma_d * t_prev.tan(), x_t)
    x = x_t / tf._bc(t.cos(), x_t)
    d = (x - tf.consistency_fn(F, x_t, t, sigma_d)) / sigma                     # dx/dsigma = (x - D(x, sigma)) / sigma
    x_p = x + (sigma_p - sigma) * d                                          # Euler
    D_p = tf.consistency_fn(F, tf._bc(t_prev.cos(), x_t) * x_p, t_prev, sigma_d)
    d_p = (x_p - D_p) / sigma_p.clamp_min(1e-30)
    x_p = torch.where(sigma_p > 0, x + (sigma_p - sigma) * 0.5 * (d + d_p), x_p)   # Heun's correction
    return tf._bc(t_prev.cos(), x_t) * x_p


def cm_loss(F, F_target, x_t, t, x_prev, t_prev, *, metric='l2', c=None, weighting='one', sigma_d=tf.SIGMA_D):
    """The discrete consistency loss of a batch (CM 2023 Eq. 7 for CD and Eq. 10 for CT; iCT §3), averaged:

        lambda(t) d(f_theta(x_t, t), f_theta-(x_t', t'))

    F        the network with gradient; F_target the target's (theta-: an EMA of theta, or theta itself: iCT's
             stopgrad theta, §3.2), evaluated without gradient and with the dropout mask F then draws (§3.1)
    x_prev   x_t' at the earlier grid time t': from the same z (CT) or one teacher ODE step from x_t (CD, heun_step)
    metric   'l2': ||.||^2 / d, the mean over elements (CM 2023's L2); 'pseudo-huber': iCT's (pseudo_huber, c)
    weighting 'one' (CM 2023) or 'inv-dsigma': lambda = 1 / (sigma - sigma'), sigma = sigma_d tan t (iCT §3.1)
    Returns (loss, terms): detached batch means -- loss, d (the metric) and dt (t - t')."""
    with tf._same_rng(x_t.device), torch.no_grad():                              # F then draws the same dropout mask
        f_target = tf.consistency_fn(F_target, x_prev, t_prev, sigma_d)
    f = tf.consistency_fn(F, x_t, t, sigma_d)
    if metric == 'l2':
        d = (f - f_target).square().flatten(1).mean(1)
    elif metric == 'pseudo-huber':
        d = pseudo_huber(f, f_target, c)
    else:
        raise ValueError(f"metric must be 'l2' or 'pseudo-huber', not {metric!r}")
    if weighting == 'inv-dsigma':
        lam = 1 / (sigma_d * (tf._wide(t).tan() - tf._wide(t_prev).tan()))
    elif weighting == 'one':
        lam = torch.ones_like(d)
    else:
        raise ValueError(f"weighting must be 'one' or 'inv-dsigma', not {weighting!r}")
    loss = lam * d
    return loss.mean(), dict(loss=loss.detach().mean(), d=d.detach().mean(), dt=(tf._wide(t) - tf._wide(t_prev)).mean())


# ---------------------------------------------------------------------------------------------------------------
# The losses of one batch, the schedules at a step, the recipes as rows and their flags' checks.


def cd_loss(net, target, teacher_F, x0, labels, ts, *, intervals, P_mean, P_std, metric, c, weighting, s_max=1.0):
    """CD's loss for one batch (CM 2023 Alg. 2): an interval (t', t) of the grid ts, x_t from (x0, z) and x_t' from
    one Heun step of the teacher's PF-ODE (heun_step), then cm_loss. net: the student with
    gradient (DDP-wrapped); target: theta-'s network (net itself, unwrapped, when mu = 0); teacher_F(labels, s): the
    teacher's F at CFG scales s [B] (None: unguided). s ~ U[1, s_max], seen by student and target, as in sCD (CM 2023
    has no guidance: s_max = 1)."""
    B = x0.shape[0]
    t, t_prev = sample_interval(B, ts, *((P_mean, P_std) if intervals == 'lognormal' else ()), device=x0.device)
    x_t, _ = tf.forward_process(x0, t, torch.randn_like(x0) * tf.SIGMA_D)           # z ~ N(0, sigma_d^2 I)
    s = 1 + (s_max - 1) * torch.rand(B, device=x0.device) if s_max > 1 else None
    x_prev = heun_step(teacher_F(labels, s), x_t, t, t_prev)      # CD's x_t'
    return cm_loss(lambda u, t: net(u, t, labels, s), lambda u, t: target(u, t, labels, s), x_t, t, x_prev,
                      t_prev, metric=metric, c=c, weighting=weighting)


def ct_loss(net, target, x0, labels, ts, *, intervals, P_mean, P_std, metric, c, weighting):
    """CT's loss for one batch (CM 2023 Alg. 3, and iCT): an interval (t', t) of the grid ts, x_t and x_t' from the
    same (x0, z), then cm_loss. net: the student with gradient (DDP-wrapped); target: theta-'s network (net
    itself, unwrapped, for iCT's stopgrad theta)."""
    B = x0.shape[0]
    t, t_prev = sample_interval(B, ts, *((P_mean, P_std) if intervals == 'lognormal' else ()), device=x0.device)
    z = torch.randn_like(x0) * tf.SIGMA_D                                            # z ~ N(0, sigma_d^2 I)
    x_t, _ = tf.forward_process(x0, t, z)
    x_prev, _ = tf.forward_process(x0, t_prev, z)                                    # the same z: CT's x_t'
    return cm_loss(lambda u, t: net(u, t, labels), lambda u, t: target(u, t, labels), x_t, t, x_prev, t_prev,
                      metric=metric, c=c, weighting=weighting)


def grid_at(args, step):
    """A discrete-time recipe's grid size N and target EMA rate mu at training step `step` (the schedules above;
    past --K they stay at their last values)."""
    if args.grid == 'fixed':
        return args.N, args.mu0
    k = min(step, args.K)
    if args.grid == 'cm2023':
        return cm2023_schedule(k, args.K, args.s0, args.s1, args.mu0)
    return ict_num_steps(k, args.K, args.s0, args.s1), args.mu0


# --recipe of train_scd.py: the discrete-time consistency distillation sCM compares against, as published; a recipe
# sets only the loss, the rest is the preset's. Every value has its flag.
CD_RECIPES = {
    'scm': dict(recipe='scm'),                                     # sCD, Alg. 1
    # CD of Consistency Models (Song et al. 2023, Table 3, CIFAR-10): N = 18, one Heun step of the teacher, mu = 0
    # (theta- = theta), uniform intervals, lambda = 1, no guidance; L2 where its best used LPIPS (downloaded weights)
    'cd2023': dict(recipe='cd2023', grid='fixed', N=18, mu0=0.0, metric='l2', weighting='one', intervals='uniform',
                   s_max=1.0),
}

# --recipe of train_sct.py: the discrete-time consistency training sCM compares against, as published; a recipe sets
# only the loss, the rest is the preset's. Every value has its flag.
CT_RECIPES = {
    'scm': dict(recipe='scm'),                                     # sCT, Alg. 1
    # iCT (Song & Dhariwal 2024): stopgrad theta (§3.2), pseudo-Huber (§3.3), lambda = 1 / (sigma_{i+1} - sigma_i)
    # (§3.1), N(k) doubling from 10 to 1280 over the run (§3.4, Eq. 7), discretized log-normal P (-1.1, 2.0) (§3.5)
    'ict': dict(recipe='ict', grid='ict', s0=10, s1=1280, mu0=0.0, metric='pseudo-huber', weighting='inv-dsigma',
                intervals='lognormal', P_mean=-1.1, P_std=2.0),
    # CT of Consistency Models (Song et al. 2023, Table 3, CIFAR-10): N(k) from 2 to 150, target EMA mu0 = 0.9,
    # uniform intervals, lambda = 1; L2 where the paper's best used LPIPS (not here: it needs downloaded weights)
    'ct2023': dict(recipe='ct2023', grid='cm2023', s0=2, s1=150, mu0=0.9, metric='l2', weighting='one',
                   intervals='uniform'),
}

# The discrete-time recipes' values (--recipe ict, ct2023, cd2023): unset, and unused, under sCM's own loss.
RECIPE_KEYS = ('grid', 'N', 's0', 's1', 'K', 'mu0', 'metric', 'huber_c', 'weighting', 'intervals')


def add_recipe_args(p, recipes):
    """--recipe: sCM's loss, or a discrete-time consistency model as published (the script's RECIPES rows, each value
    overridable by its flag below; the sections above)."""
    a = p.add_argument
    rows = '; '.join(f'{name}: ' + (', '.join(f'{k}={v}' for k, v in row.items() if k != 'recipe') or "sCM's loss")
                     for name, row in recipes.items())
    a('--recipe', choices=list(recipes), default='scm', help=f'the loss. {rows}')
    a('--grid', choices=['fixed', 'cm2023', 'ict'], help="the grid's size N(k): fixed --N, CM 2023's schedule "
      "(App. C) or iCT's doubling curriculum (Eq. 7) from --s0 to --s1 over --K steps")
    a('--N', type=int, help='grid points of a fixed grid (CM 2023 CD: 18 on CIFAR-10)')
    a('--s0', type=int, help='initial grid size of the curriculum')
    a('--s1', type=int, help='final grid size of the curriculum')
    a('--K', type=int, help='steps over which the curriculum runs (default: --steps; pass it when a run grows)')
    a('--mu0', type=float, help="the target theta-'s EMA rate: mu0 on a fixed grid, CM 2023's mu(k) = "
      "exp(s0 log mu0 / N(k)) on its schedule; 0 = stopgrad theta (iCT)")
    a('--metric', choices=['l2', 'pseudo-huber'], help='d(x, y): the mean square, or iCT\'s pseudo-Huber (LPIPS: '
      'not here, it needs downloaded VGG weights)')
    a('--huber-c', type=float, help="pseudo-Huber's c (default 0.00054 sqrt(d), iCT)")
    a('--weighting', choices=['one', 'inv-dsigma'], help="lambda: 1 (CM 2023) or 1 / (sigma_{i+1} - sigma_i) (iCT)")
    a('--intervals', choices=['uniform', 'lognormal'], help="the grid interval's distribution: uniform (CM 2023) "
      "or iCT's discretized log-normal with --P-mean, --P-std")


def check_recipe(args):
    """A discrete-time recipe's values are complete and sCM's own loss has none of them: one line, before any work."""
    if args.recipe == 'scm':
        given = [k for k in RECIPE_KEYS if getattr(args, k) is not None]
        if given:
            raise UserError(', '.join('--' + k.replace('_', '-') for k in given) + ' belong to the discrete-time '
                            'recipes: add --recipe (see --help)')
        return
    for flag, bad in (('--discrete', args.discrete), ('--two-pass', args.two_pass),
                      ('--vsd', getattr(args, 'vsd', 0))):
        if bad:
            raise UserError(f'{flag} is for sCM\'s loss, not --recipe {args.recipe}')
    if args.K is None and args.grid != 'fixed':
        args.K = args.steps                                   # a resume to more steps must pass the first --K
    for k in ['N'] if args.grid == 'fixed' else ['s0', 's1', 'K']:
        if getattr(args, k) is None or getattr(args, k) < 2 - (k == 'K'):
            raise UserError(f'--recipe {args.recipe} with --grid {args.grid} needs --{k} '
                            f'{"of 1 or more" if k == "K" else "of 2 or more"}, not {getattr(args, k)}')
    if args.grid != 'fixed' and args.s1 < args.s0:
        raise UserError(f'--s1 ({args.s1}) must be at least --s0 ({args.s0})')
    if not 0 <= args.mu0 < 1:
        raise UserError(f'--mu0 must be in [0, 1), not {args.mu0}')
    if args.huber_c is not None and args.huber_c <= 0:
        raise UserError(f'--huber-c must be positive, not {args.huber_c}')
