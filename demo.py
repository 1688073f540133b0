"""Offline demo: sCD and sCT on a 2-D Gaussian mixture whose TrigFlow teacher is exact, in a few CPU minutes.

    python demo.py                 # a few minutes on a CPU, no download; writes demo.png
    python demo.py --quick         # a much smaller run that goes through every code path

Data: 8 Gaussians on a circle, component std S = 0.08, radius chosen so that the data std is sigma_d = 0.5 (sCM §3).
A mixture's denoiser E[x0 | x_t], hence its PF-ODE, is closed-form, so the diffusion teacher is exact, not a network:
sCD distills it (dxdt = sigma_d F_teacher(x_t / sigma_d, t)), sCT learns from data alone (dxdt = cos t z - sin t x0).
Both train the same MLP F_theta from scratch with trigflow.scm_loss (Eq. 8, Alg. 1): tangent normalization and warmup,
the log-normal time proposal, Adam, an EMA to sample from. The learned weighting w_phi(t) is off (see ADAPTIVE_WEIGHT).

Prints the squared MMD (RBF kernel, h = 0.1, x 1e3) between 50k samples of each sampler and 50k fresh draws of the
mixture: a second data sample (the estimate's floor), the teacher's ODE (EDM Heun, 18 steps = 35 NFE), sCD and sCT
with 1 and 2 steps (1 and 2 NFE), the untrained student, and pure noise N(0, sigma_d^2 I); then sCD 1-step / teacher
ODE, which should be <= 1.2. What seeds 0, 1 and 2 print is in figures/demo-seed{0,1,2}.txt (STAGES=demo bash
reproduce.sh), and writes demo.png: 5000 points each of the data, the teacher ODE, and sCD and sCT with 1 and 2 steps.
"""
import argparse
import copy
import math
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import model
import trigflow as tf

SIGMA_D = tf.SIGMA_D
K, S = 8, 0.08                                  # 8 components of std S on a circle
R = math.sqrt(2 * (SIGMA_D ** 2 - S ** 2))      # radius: per-coordinate variance R^2/2 + S^2 = sigma_d^2
MU = R * torch.tensor([[math.cos(2 * math.pi * k / K), math.sin(2 * math.pi * k / K)] for k in range(K)])  # [K, 2]

# Training defaults, the same for sCD and sCT; tuned for this demo, not a paper configuration (the paper trains for
# 100k+ steps on GPUs, starting from a trained teacher network).
STEPS = 3000                    # optimizer steps per method
BATCH = 512
HIDDEN, DEPTH = 64, 3           # model.MLP
LR = 5e-3                       # Adam, constant, then decayed linearly to 0 over the last half of the steps
EMA_HALFLIFE = 1 / 30           # EMA half-life as a fraction of the steps; we sample from the EMA
# The gradient's norm clipped at GRAD_CLIP before each Adam step (not in the paper, whose rates are 50x smaller). Without
# it, seed 2's sCD loss jumped from 0.05-0.09 to 0.25 at step 2400 and never recovered (1-step 10.7e-3, 11.3x the
# teacher ODE); with it, 0.41e-3. Lowering the rate to 2.5e-3 also cured it (0.60e-3), clipping is the smaller change.
GRAD_CLIP = 1.0
# Time proposal log(sigma_d tan t) ~ N(P_mean, P_std^2) (App. A, Alg. 1), biased toward clean data further than the
# paper's (-1.0, 1.4) for CIFAR-10 (App. G.2), because this data's detail is finer than images': the modes separate at
# sigma ~ S = 0.08, and small t (t < 0.3, sigma < 0.15) is where the sCD tangent g stayed largest in our runs.
# (-2.2, 1.4) puts sigma's median at 0.11 and its +-1 std interval at [0.03, 0.45]. With (-1.0, 1.4), seed 0 printed
# sCD 1-step 1.6e-3 (1.75 x the teacher ODE) and sCT 1-step 11.5e-3 instead of 0.41e-3 and 6.7e-3.
P_MEAN, P_STD = -2.2, 1.4
WARMUP = 1 / 6                  # tangent warmup H as a fraction of the steps (§4.2: 10k iterations)
# The learned adaptive weighting w_phi(t) (Eq. 8) is off by default because here it breaks sCD. At its optimum
# e^w = 1 / E[||g||^2 / D | t] (g normalized), so it weights each t by how consistent the model already is there.
# sCD's tangent is exact and gets tiny where the model is consistent: in a shorter run e^w was 3-5 at t < 0.3 but
# 50-200 at t > 0.6, the small-t tangent (where the modes are resolved) never shrank, and sCD 1-step ended as a ring of
# points, 13.3e-3 at seed 0 (0.41e-3 without). sCT's one-sample tangent is noisy at every t; it does about as well
# either way (1-step 5.4e-3 with, 6.7e-3 without). --adaptive-weight turns it on.
ADAPTIVE_WEIGHT = False
N_EVAL, BANDWIDTH = 50_000, 0.1  # samples per sampler for the distance; RBF bandwidth
QUICK_STEPS, QUICK_BATCH, QUICK_N_EVAL = 300, 256, 20_000  # --quick
N_PLOT = 5000                   # points per scatter panel


# ---------------------------------------------------------------------------------------------------------------
# The data and its exact TrigFlow teacher.


def sample_data(n, generator):
    """n draws of the mixture sum_k (1/K) N(MU_k, S^2 I): [n, 2]."""
    k = torch.randint(K, (n,), generator=generator)
    return MU[k] + S * torch.randn(n, 2, generator=generator)


def denoiser(x_sigma, sigma):
    """The exact EDM denoiser D(x_sigma, sigma) = E[x0 | x0 + sigma eps = x_sigma] of the mixture. x_sigma is a
    mixture of N(MU_k, (S^2 + sigma^2) I); D is the responsibility-weighted sum of the components' posterior means
    MU_k + S^2 / (S^2 + sigma^2) (x_sigma - MU_k), the responsibilities a softmax (logsumexp) of the log densities."""
    var = S ** 2 + sigma.reshape(-1, 1) ** 2                                    # [B, 1]
    d2 = (x_sigma[:, None, :] - MU[None]).square().sum(-1)                       # [B, K]
    resp = torch.softmax(-d2 / (2 * var), dim=1)                                 # equal weights and variances
    post = MU[None] + (S ** 2 / var)[..., None] * (x_sigma[:, None, :] - MU[None])  # [B, K, 2]
    return (resp[..., None] * post).sum(1)


# F_teacher(x_t / sigma_d, t) = (cos t x_t - D(x_t / cos t, sigma_d tan t)) / (sigma_d sin t), by Eq. 23 / App. B.2:
# the PF-ODE velocity is dx_t/dt = sigma_d F_teacher (Eq. 3). test_scm.py checks this conversion of a mixture denoiser
# of the same form against EDM's ODE (test_converted_edm_denoiser_traces_the_same_ode).
F_teacher = tf.F_from_denoiser(denoiser)


# ---------------------------------------------------------------------------------------------------------------
# Distance to the true distribution.


def mmd2(x, y, h=BANDWIDTH, lim=2.5, bins=400):
    """Squared MMD between the samples x [n, 2] and y [m, 2] with the RBF kernel k(a, b) = exp(-|a - b|^2 / (2 h^2))
    (Gretton et al. 2012, the biased estimate): (p - q)^T K (p - q), where p, q are the two samples' histograms on a
    fine grid over [-lim, lim]^2 (bin width h / 8; points beyond the grid go to its edge) and K is separable, so this
    costs two small matrix products for any n; it agrees with the sum over all pairs of points to about 1%. It counts
    each point's pair with itself, so two samples of one distribution give about 2 (1 - E k) / n, not 0: the 'data'
    row shows that floor. h = 0.1, about one component's std, sees each mode's width and any mass between the modes;
    a median-heuristic h (~0.7 here) would see only the ring."""
    def hist(a):                                                                 # [bins, bins], sums to 1
        ij = ((a.double() + lim) / (2 * lim) * bins).floor().long().clamp(0, bins - 1)
        flat = torch.zeros(bins * bins, dtype=torch.float64).index_add_(
            0, ij[:, 0] * bins + ij[:, 1], torch.ones(len(a), dtype=torch.float64))
        return flat.reshape(bins, bins) / len(a)
    c = (torch.arange(bins, dtype=torch.float64) + 0.5) * (2 * lim / bins) - lim  # bin centres
    k = torch.exp(-(c[:, None] - c[None]).square() / (2 * h * h))              # the 1-D kernel between centres
    d = hist(x) - hist(y)
    return (d * (k @ d @ k)).sum().item()


# ---------------------------------------------------------------------------------------------------------------
# sCD and sCT (Alg. 1).


def new_student(seed):
    """F_theta(u, t), randomly initialized. The paper starts sCD and sCT from the teacher's EMA weights (App. G.2); here
    the teacher is a formula, not a network, so the student starts from scratch, and the tangent warmup (r = 0 at
    first: velocity matching, Eq. 6 with its second term off) first makes it a diffusion model."""
    torch.manual_seed(seed)                    # sCD and sCT start from the same weights
    return model.MLP(dim=2, hidden=HIDDEN, depth=DEPTH)


@torch.no_grad()
def update_ema(ema, net, beta):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - beta)


def train(method, steps, seed, batch=BATCH, adaptive_weight=ADAPTIVE_WEIGHT):
    """Train F_theta by sCD (method 'sCD', against the exact teacher) or sCT ('sCT', from data); return its EMA."""
    net = new_student(seed)
    ema = copy.deepcopy(net).requires_grad_(False)
    wnet = tf.AdaptiveWeight() if adaptive_weight else None                      # w_phi(t) of Eq. 8
    opt = torch.optim.Adam(list(net.parameters()) + (list(wnet.parameters()) if wnet else []), lr=LR)
    beta = 0.5 ** (1 / (EMA_HALFLIFE * steps))
    H = max(1, round(WARMUP * steps))
    gen = torch.Generator().manual_seed(seed)  # data, noise and times: the same draws for sCD and sCT
    for step in (bar := tqdm(range(steps), desc=method, leave=False)):
        x0 = sample_data(batch, gen)                                             # [B, 2]
        z = torch.randn(batch, 2, generator=gen) * SIGMA_D
        t = tf.sample_t(batch, P_MEAN, P_STD, generator=gen)                     # [B]
        x_t, v_t = tf.forward_process(x0, t, z)                                 # x_t, cos t z - sin t x0 (§3)
        dxdt = tf.velocity(F_teacher, x_t, t) if method == 'sCD' else v_t      # sCD: teacher's PF-ODE; sCT: data
        loss, terms = tf.scm_loss(net, x_t, t, dxdt, w=wnet(t) if wnet else None, r=tf.tangent_warmup(step, H))
        for group in opt.param_groups:
            group['lr'] = LR * min(1.0, 2 * (1 - step / steps))                 # linear decay over the last half
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]['params'], GRAD_CLIP)
        opt.step()
        update_ema(ema, net, beta)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}", g_rms=f"{terms['tangent_rms'].item():.3f}")
    return ema


# ---------------------------------------------------------------------------------------------------------------
# Picture: one scatter panel per sampler, drawn as pixel densities (no plotting library).


def panel(x, title, size=220, lim=1.15):
    """x [n, 2] -> a white RGB panel [size + 16, size, 3] with points as 2x2 dots, darker where they pile up."""
    counts = np.zeros((size, size))
    ij = np.floor((x.numpy() / lim + 1) / 2 * (size - 1)).astype(int)
    ij = ij[(ij >= 0).all(1) & (ij < size - 1).all(1)]
    for di in (0, 1):
        for dj in (0, 1):
            np.add.at(counts, (size - 2 - ij[:, 1] + di, ij[:, 0] + dj), 1)
    shade = 1 - np.minimum(counts / 6, 1) * 0.85                                 # 6 hits per pixel = darkest
    img = np.full((size + 16, size, 3), 255, np.uint8)
    img[16:] = (shade[..., None] * [255, 255, 255] + (1 - shade[..., None]) * [20, 50, 140]).astype(np.uint8)
    img[16, :], img[-1, :], img[16:, 0], img[16:, -1] = 180, 180, 180, 180     # frame
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((4, 2), title, fill=(0, 0, 0))
    return np.asarray(pil)


def save_panels(samples, path, cols=3):
    """samples: {title: [n, 2]} -> one PNG, cols panels per row."""
    tiles = [panel(x, title) for title, x in samples.items()]
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, optimize=True)


# ---------------------------------------------------------------------------------------------------------------


def run(steps=STEPS, seed=0, quick=False, out=None, adaptive_weight=ADAPTIVE_WEIGHT):
    """Train sCD and sCT, sample, print the table, write the PNG if out; return {sampler: squared MMD}."""
    start = time.time()
    batch, n_eval = (QUICK_BATCH, QUICK_N_EVAL) if quick else (BATCH, N_EVAL)
    steps = min(steps, QUICK_STEPS) if quick else steps
    nets = {method: train(method, steps, seed, batch, adaptive_weight) for method in ('sCD', 'sCT')}

    gen = torch.Generator().manual_seed(seed + 1000)                            # evaluation draws, apart from training
    ref = sample_data(n_eval, gen)                                               # stands for the true distribution
    z = torch.randn(n_eval, 2, generator=gen) * SIGMA_D                          # x_{t_max}, shared by all samplers
    def renoise(x):                                                              # the 2-step sampler's fresh noise
        return torch.randn(x.shape, generator=gen)
    samples = {'data': sample_data(n_eval, gen),
               'teacher ODE (35 NFE)': tf.sample_heun(F_teacher, z, 18)}        # EDM Heun, 18 steps (App. G.1)
    for method in ('sCD', 'sCT'):                                                # 1 and 2 steps (§5.2): 1 and 2 NFE
        samples[f'{method} 1-step'] = tf.sample_consistency(nets[method], z, (tf.T_MAX,))
        samples[f'{method} 2-step'] = tf.sample_consistency(nets[method], z, (tf.T_MAX, tf.T_MID), randn_like=renoise)
    samples['untrained 1-step'] = tf.sample_consistency(new_student(seed), z, (tf.T_MAX,))  # both start here
    samples['noise N(0, sigma_d^2 I)'] = z
    dist = {name: mmd2(x, ref) for name, x in samples.items()}

    print(f'squared MMD x 1e3 to {n_eval} fresh draws of the mixture (RBF kernel, h = {BANDWIDTH}; 0 = perfect):')
    for name, d in dist.items():
        print(f'  {name:24s} {1e3 * d:9.3f}')
    ratio = dist['sCD 1-step'] / dist['teacher ODE (35 NFE)']
    if quick:   # 300 steps: the students have not yet pulled their samples onto the modes (rings in the PNG)
        print(f'quick run ({steps} steps per method, {time.time() - start:.0f} s): a smoke test of every code path, '
              f'not a result; trained students must only beat the untrained one. Run without --quick for the result.')
    else:
        print(f'sCD 1-step / teacher ODE = {ratio:.2f} (goal <= 1.2); {steps} steps per method, seed {seed}, '
              f'{time.time() - start:.0f} s')
    if out:
        save_panels({name: samples[name][:N_PLOT] for name in list(samples)[:6]}, out)
        print(f'wrote {out}')
    return dist


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--steps', type=int, default=STEPS, help='optimizer steps per method')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='demo.png', help='the PNG of the six scatter panels')
    p.add_argument('--quick', action='store_true', help='a much smaller run that runs every code path')
    p.add_argument('--adaptive-weight', action='store_true', help="the paper's learned weighting w_phi(t) (Eq. 8)")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))                      # 2 CPU cores are enough
    run(args.steps, args.seed, args.quick, args.out, args.adaptive_weight)


if __name__ == '__main__':
    main()
