"""Zero-shot editing with a consistency model (Consistency Models 2023, Alg. 4 and App. D), in TrigFlow time
(x_t = cos t x0 + sin t z): inpaint, colorize, superres, stroke (SDEdit), denoise, interpolate.

  python edit.py ckpt.pt inpaint --input img.png --mask mask.png --label 3     # writes img-inpaint.png
  python edit.py ckpt.pt superres --input img.png --patch 4                   # writes img-superres.png
  python edit.py ckpt.pt interpolate --grid interpolate.png -n 9               # slerp between two noises

Each edit reads --input (and --mask) and writes <input>-<edit>.png beside it: the input, then the result.

Every edit is a linear map A with inverse A^-1 and a mask Omega: 1 = generate, 0 = keep from the reference y.
"""
import argparse
import math
import os

import torch

import cli
import data
import trigflow as tf
from sample import add_sampler_args, check_args, data_info, load_net, make_F, seeded_randn

EDITS = ('inpaint', 'colorize', 'superres', 'stroke', 'denoise', 'interpolate')

GRAY = (0.2989, 0.5870, 0.1140)                                  # luminance weights (CM 2023 App. D)


def orthogonal_basis(first):
    """An orthogonal matrix whose first column is `first` normalized (QR, sign fixed so that column is positive)."""
    first = torch.as_tensor(first, dtype=torch.float64)
    n = first.numel()
    M = torch.eye(n, dtype=torch.float64)
    M[:, 0] = first
    Q, _ = torch.linalg.qr(M)
    return Q * torch.sign(Q[:, 0] @ first)


def colorization_ops(x_like):
    """A maps RGB to a basis whose first axis is luminance: A(x)[k] = sum_c x[c] Q[c, k]. Omega keeps axis 0."""
    Q = orthogonal_basis(GRAY).to(x_like)
    A = lambda x: torch.einsum('bchw,ck->bkhw', x, Q)
    Ainv = lambda y: torch.einsum('bkhw,ck->bchw', y, Q)
    Omega = torch.ones_like(x_like)
    Omega[:, 0] = 0
    return A, Ainv, Omega


def superres_ops(x_like, p):
    """A maps each p x p patch (per channel) to coefficients in an orthogonal basis whose first vector is the patch
    mean direction; Omega keeps coefficient 0 (the patch mean) and generates the rest."""
    B, C, H, W = x_like.shape
    Q = orthogonal_basis(torch.ones(p * p)).to(x_like)

    def A(x):                                                     # [B, C, H, W] -> [B, C, p*p, H/p, W/p]
        b = x.shape[0]                                            # any batch size, not just x_like's
        patches = x.reshape(b, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, C, p * p, H // p, W // p)
        return torch.einsum('bcmhw,mk->bckhw', patches, Q)

    def Ainv(y):
        b = y.shape[0]
        patches = torch.einsum('bckhw,mk->bcmhw', y, Q).reshape(b, C, p, p, H // p, W // p)
        return patches.permute(0, 1, 4, 2, 5, 3).reshape(b, C, H, W)
    Omega = torch.ones(B, C, p * p, H // p, W // p, dtype=x_like.dtype, device=x_like.device)
    Omega[:, :, 0] = 0
    return A, Ainv, Omega


def identity_ops(mask):
    return (lambda x: x), (lambda y: y), mask


@torch.no_grad()
def edit(F, y, A, Ainv, Omega, ts, randn_like=torch.randn_like, clamp=True):
    """CM 2023 Alg. 4 in TrigFlow time: start from y noised to ts[0]; at each time denoise with f, then put back the
    kept part A(y) (1 - Omega); re-noise the estimate to the next time as x_t = cos t x0 + sin t z."""
    y = Ainv(A(y) * (1 - Omega))
    x = math.cos(ts[0]) * y + math.sin(ts[0]) * tf.SIGMA_D * randn_like(y)
    for i, t in enumerate(ts):
        if i > 0:
            x = math.cos(t) * x + math.sin(t) * tf.SIGMA_D * randn_like(x)
        x = tf.consistency_fn(F, x, torch.full((x.shape[0],), t, device=x.device))
        if clamp:
            x = x.clamp(-1, 1)
        x = Ainv(A(y) * (1 - Omega) + A(x) * Omega)
    return x


def edit_times(n=40):
    """The CM 2023 editing schedule: EDM's grid with N = 40 (rho = 7), as TrigFlow times, descending."""
    return [float(tf.t_from_sigma(s)) for s in tf.edm_sigmas(n)[:-1]]


def slerp(z1, z2, alpha):
    """Spherical interpolation of two noises (CM 2023 App. D)."""
    cos = (z1 * z2).flatten(1).sum(1) / (z1.flatten(1).norm(dim=1) * z2.flatten(1).norm(dim=1))
    psi = torch.acos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z1.ndim - 1)))
    return (torch.sin((1 - alpha) * psi) * z1 + torch.sin(alpha * psi) * z2) / torch.sin(psi)


def run_edit(net, ckpt, args, device):
    C, H, W = data_info(ckpt)[0]
    labels = None if not ckpt['model_kwargs'].get('label_dim') else torch.tensor([args.label], device=device)
    F = make_F(net, ckpt, labels, args.cfg)
    torch.manual_seed(args.seed)
    if args.edit == 'interpolate':
        z1, _ = seeded_randn(args.seed, [0], (C, H, W), device)
        z2, _ = seeded_randn(args.seed, [1], (C, H, W), device)
        alphas = torch.linspace(0, 1, args.num)
        z = torch.cat([slerp(z1, z2, float(a)) for a in alphas]) * tf.SIGMA_D
        Fb = make_F(net, ckpt, None if labels is None else labels.repeat(len(alphas)), args.cfg)
        out = tf.sample_consistency(Fb, z)
        path = args.grid
        data.save_grid(out.cpu(), path, nrow=len(alphas))
        return path
    if not args.input:
        raise cli.UserError(f'{args.edit} needs --input IMAGE.png')
    y = data.load_image(args.input, C).to(device)
    if y.shape[-2:] != (H, W):
        raise cli.UserError(f'{args.input} is {y.shape[-1]}x{y.shape[-2]} but the model makes {W}x{H} images')
    if args.edit == 'denoise':                                    # one evaluation: f(cos t x_noisy, t)
        t = float(tf.t_from_sigma(args.sigma))
        noisy = y + args.sigma * torch.randn_like(y)
        out = tf.consistency_fn(F, math.cos(t) * noisy, torch.full((1,), t, device=device))
        out = torch.cat([y, noisy.clamp(-1, 1), out.clamp(-1, 1)])
    else:
        ts = edit_times(args.edit_steps)
        if args.edit == 'inpaint':
            if not args.mask:
                raise cli.UserError('inpaint needs --mask MASK.png (white = generate)')
            mask = (data.load_image(args.mask, 1).to(device) > 0).to(y.dtype).expand_as(y)
            ops = identity_ops(mask)
        elif args.edit == 'colorize':
            if C != 3:
                raise cli.UserError('colorize needs an RGB model')
            gray = (y * torch.tensor(GRAY, device=device).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(y)
            y = gray.clone()
            ops = colorization_ops(y)
        elif args.edit == 'superres':
            if H % args.patch or W % args.patch:
                raise cli.UserError(f'--patch {args.patch} must divide the image size {W}x{H}')
            ops = superres_ops(y, args.patch)
        elif args.edit == 'stroke':                                # SDEdit: noise the painting to 1.4781, 1.3512
            ops, ts = identity_ops(torch.ones_like(y)), [1.4781, 1.3512]
        out = edit(F, y, *ops, ts)
        out = torch.cat([y, out])
    base, _ = os.path.splitext(args.input)
    path = f'{base}-{args.edit}.png'
    data.save_grid(out.cpu(), path, nrow=out.shape[0])
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='checkpoint.pt of train_scd.py or train_sct.py')
    p.add_argument('edit', choices=EDITS, help='the edit (see above)')
    add_sampler_args(p, batch=False)
    p.add_argument('--input', help='image to edit (PNG/JPG)')
    p.add_argument('--mask', help='inpainting mask: white = generate')
    p.add_argument('--patch', type=int, default=4, help='super-resolution patch size')
    p.add_argument('--sigma', type=float, default=0.5, help='denoising: EDM noise level of the input')
    p.add_argument('--edit-steps', type=int, default=40, help='editing schedule length (CM 2023: 40)')
    p.add_argument('-n', '--num', type=int, default=9, help='interpolate: images from the first noise to the second')
    p.add_argument('--grid', default='interpolate.png', help='interpolate: the PNG to write')
    args = p.parse_args()
    args.batch = 1
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    net, ckpt = load_net(args.checkpoint, args.raw, device)
    check_args(args, ckpt)
    if data_info(ckpt)[1]:
        raise cli.UserError('the zero-shot edits work on pixels; this model generates SD-VAE latents')
    if ckpt['model_kwargs'].get('label_dim') and args.label is None:
        raise cli.UserError(f'this model is class-conditional ({ckpt["model_kwargs"]["label_dim"]} classes): '
                            f'pass --label K for the class of the edited image')
    if args.edit == 'interpolate':
        cli.check_output(args.grid)
    elif not args.input:
        raise cli.UserError(f'{args.edit} needs --input IMAGE.png')
    print(f'wrote {run_edit(net, ckpt, args, device)}')


if __name__ == '__main__':
    cli.main_guard(main)
