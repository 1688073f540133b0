"""Sample from a checkpoint of train_teacher.py, train_scd.py or train_sct.py (zero-shot edits: edit.py).

  python sample.py runs/scd-fashion-s/checkpoint.pt --grid samples.png               # 1-step grid
  python sample.py runs/scd-fashion-s/checkpoint.pt --steps 2 --grid samples2.png   # 2-step, through t = 1.1
  python sample.py runs/teacher-fashion-s/checkpoint.pt --grid teacher.png          # teacher: Heun, 35 NFE
  torchrun --nproc_per_node=8 sample.py ckpt.pt -n 50000 --npz samples.npz           # sharded, for FID

Image i always gets the noise of seed (--seed, i), so a sharded run writes the same images as a single process.
The functions here (loading a network, the noise, the samplers' flags) are also those of fid.py and edit.py.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as ck
import cli
import data
import latents
import trigflow as tf

# ---------------------------------------------------------------------------------------------------------------
# Loading a network and making per-image noise.


def load_net(path, raw=False, device='cpu'):
    """(network, checkpoint) with the EMA weights (or the raw ones) of any of the three training scripts."""
    ckpt = ck.load(path)
    if raw and 'net' not in ckpt:
        raise cli.UserError(f'{path} holds the EMA weights only (checkpoint.py export): drop --raw')
    state = ckpt['net' if raw else 'ema']
    net = ck.build(dict(ckpt['model_kwargs'], dropout=0.0), state, path)      # shapes checked before values
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise cli.UserError(f'{path}: the {"raw" if raw else "EMA"} weights hold NaN or Inf ({len(bad)} tensors, '
                            f'e.g. {bad[0]}); the run diverged before this checkpoint')
    if data_info(ckpt)[1]:
        latents.get_vae(latent_stats(ckpt)['vae'], device)          # a latent model's decoder: fail before sampling
    return net.eval().requires_grad_(False).to(device), ckpt


def check_args(args, ckpt):
    """Fill --heun-steps and --cfg from the run's preset (checkpoint.sampling_defaults), then one line for every
    sampler setting that would give wrong images without failing."""
    defaults = ckpt.get('sampling', {})
    if args.sigmas:                                                # EDM sigmas -> TrigFlow times (App. B.2)
        if args.ts or any(s <= 0 for s in args.sigmas):
            raise cli.UserError('--sigmas: positive noise levels, and not with --ts')
        args.ts = [math.atan(s / tf.SIGMA_D) for s in args.sigmas]
    if args.heun_steps is None:
        args.heun_steps = defaults.get('heun_steps', 18)
    if args.cfg is None:
        cfg = defaults.get('cfg', 1.0)                             # a guided student's: (1 step, 2 steps)
        args.cfg = cfg[0 if args.steps == 1 and not (args.ts and len(args.ts) > 1) else 1] \
            if isinstance(cfg, (list, tuple)) else cfg
    classes = ckpt['model_kwargs'].get('label_dim', 0)
    if args.num < 1 or args.batch < 1:
        raise cli.UserError('-n/--num and --batch must be at least 1')
    if args.label is not None and not 0 <= args.label < classes:
        raise cli.UserError(f'--label {args.label}: the model has ' + (f'classes 0..{classes - 1}' if classes
                                                                       else 'no classes'))
    if ckpt['method'] == 'teacher':
        if args.sampler == 'consistency' or args.ts or args.steps != 1:
            raise cli.UserError('a teacher samples with EDM Heun (--heun-steps N, 2N - 1 NFE); --steps, --ts and '
                                '--sampler consistency are for sCD/sCT checkpoints')
    if args.sampler == 'heun' and args.ts:
        raise cli.UserError('--sampler heun solves the ODE on its own --heun-steps grid; --ts and --sigmas are for the '
                            'consistency sampler')
    if ckpt['method'] == 'teacher' or args.sampler == 'heun':
        if args.heun_steps < 2:
            raise cli.UserError(f'--heun-steps {args.heun_steps}: Heun needs at least 2 steps (18 = 35 NFE)')
    elif args.ts and not (all(0 < t <= tf.T_MAX for t in args.ts) and
                          all(a > b for a, b in zip(args.ts, args.ts[1:]))):
        raise cli.UserError(f'--ts {" ".join(map(str, args.ts))}: times must descend, within (0, {tf.T_MAX:.4f}]'
                            + (' (sigma within (0, 80])' if args.sigmas else ''))


def data_info(ckpt):
    """(C, H, W) and whether the model works in SD-VAE latent space."""
    if 'data' in ckpt:
        return tuple(ckpt['data']['shape']), ckpt['data']['is_latent']
    kw = ckpt['model_kwargs']
    C, R = (kw['in_channels'], kw['input_size']) if kw['arch'] == 'dit' else (kw['img_channels'], kw['img_resolution'])
    return (C, R, R), str(ckpt['config'].get('data', '')).endswith('.npy')


def seeded_randn(seed, indices, shape, device):
    """Standard normal noise of shape [len(indices), *shape], image i drawn from its own generator (seed, i)."""
    gens = [torch.Generator().manual_seed(ck.step_seed(seed, 0, 0, int(i))) for i in indices]

    def randn_like(x):   # later draws (2-step re-noising) continue each image's own generator
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)
    z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    return z, randn_like


def make_F(net, ckpt, labels, cfg):
    """F(u, t) with class labels and guidance: a guided sCD student takes s as an input; a teacher is guided by
    mixing its conditional and unconditional outputs (trigflow.guided)."""
    if cfg == 1 or labels is None:
        s = None
    elif ckpt['model_kwargs'].get('cfg_embed'):
        s = torch.full((labels.shape[0],), float(cfg), device=labels.device)
    else:
        return tf.guided(lambda u, t: net(u, t, labels), lambda u, t: net(u, t, torch.full_like(labels, -1)), cfg)
    return lambda u, t: net(u, t, labels, s)


def add_sampler_args(p, batch=True):
    """The flags that choose how images are drawn (sample.py and fid.py checkpoint, which has its own --batch)."""
    p.add_argument('--raw', action='store_true', help='the raw weights instead of the EMA')
    p.add_argument('--steps', type=int, default=1, choices=[1, 2], help='consistency steps: 1, or 2 through t = 1.1')
    p.add_argument('--ts', type=float, nargs='+', help='any list of descending TrigFlow times (overrides --steps)')
    p.add_argument('--sigmas', type=float, nargs='+', help='the same as EDM noise levels, t = arctan(sigma / sigma_d), '
                   'as CM 2023 gives its multistep times: e.g. 80 1.3824 (its 2-step CD on ImageNet 64: index 22 of '
                   'its 40-step Karras grid) or 80 1.9128 (CT: 106 of 201)')
    p.add_argument('--sampler', choices=['consistency', 'heun'],
                   help='consistency (sCD/sCT; default) or heun: the ODE sampler (a teacher\'s only one)')
    p.add_argument('--heun-steps', type=int, help="Heun steps, 2N - 1 NFE (default: the run's preset: 32 on ImageNet, "
                   "else 18)")
    p.add_argument('--cfg', type=float, help="classifier-free guidance scale, 1 = none (default: the run's preset: "
                   "Table 6's for FID on ImageNet 512, else 1)")
    p.add_argument('--label', type=int, default=None, help='class of every image (default: image index mod classes)')
    p.add_argument('--seed', type=int, default=0, help='image i gets the noise of seed (--seed, i)')
    if batch:
        p.add_argument('--batch', type=int, default=64, help='images per forward pass')


@torch.no_grad()
def generate(net, ckpt, z, labels, args, randn_like):
    """Samples in the network's space from unit noise z: Heun for a teacher (or --sampler heun), else consistency."""
    F = make_F(net, ckpt, labels, args.cfg)
    z = z * tf.SIGMA_D                                           # x_{t_max} ~ N(0, sigma_d^2 I)
    if ckpt['method'] == 'teacher' or args.sampler == 'heun':
        return tf.sample_heun(F, z, num_steps=args.heun_steps)
    ts = tuple(args.ts) if args.ts else ((tf.T_MAX,) if args.steps == 1 else (tf.T_MAX, tf.T_MID))
    return tf.sample_consistency(F, z, ts, randn_like=randn_like)


def image_batches(net, ckpt, indices, args, device, desc='sampling', progress=True):
    """Yield uint8 images [b, H, W, C] for `indices`, args.batch at a time: image i from noise seed (args.seed, i),
    class args.label or i mod classes. This rank's share under torchrun: indices = range(rank, num, world)."""
    shape = data_info(ckpt)[0]
    classes = ckpt['model_kwargs'].get('label_dim', 0)
    for i in tqdm(range(0, len(indices), args.batch), desc=desc, disable=not progress):
        idx = indices[i:i + args.batch]
        z, randn_like = seeded_randn(args.seed, idx, shape, device)
        labels = None
        if classes:
            labels = torch.tensor([args.label if args.label is not None else j % classes for j in idx], device=device)
        x = generate(net, ckpt, z, labels, args, randn_like)
        if not torch.isfinite(x).all():
            raise cli.UserError(f'the network produced NaN or Inf samples (images {idx[0]}..{idx[-1]})')
        yield data.to_uint8(to_images(x, ckpt).cpu())


def to_images(x, ckpt):
    """Network space -> pixels in [-1, 1]. Latents are un-normalized and decoded by the VAE they were encoded with
    (latents.py; needs diffusers)."""
    if not data_info(ckpt)[1]:
        return x.clamp(-1, 1)
    return latents.decode(x, latent_stats(ckpt))


def latent_stats(ckpt):
    """The VAE and normalization a latent model's data had (older checkpoints: the paper's)."""
    return ckpt.get('data', {}).get('latents') or dict(vae=latents.PAPER_VAE, mean=latents.LATENT_MEAN,
                                                       std=latents.LATENT_STD)


# ---------------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='checkpoint.pt of train_teacher.py, train_scd.py or train_sct.py')
    add_sampler_args(p)
    p.add_argument('-n', '--num', type=int, default=64, help='number of images (use -n under torchrun)')
    p.add_argument('--grid', help='write a PNG grid of the first 64 images (all of them if --num <= 256)')
    p.add_argument('--npz', help='write the --num images as uint8 [N, H, W, C] to this .npz (key "samples")')
    args = p.parse_args()

    rank, world, device = cli.init_distributed()
    net, ckpt = load_net(args.checkpoint, args.raw, device)
    check_args(args, ckpt)
    for path in (args.grid, args.npz):
        cli.check_output(path)
    if not (args.grid or args.npz):
        raise cli.UserError('nothing to write: pass --grid PNG and/or --npz FILE')
    mine = list(range(rank, args.num, world))                     # this rank's images: i = rank, rank + world, ...
    parts = list(image_batches(net, ckpt, mine, args, device, progress=rank == 0))
    mine_images = np.concatenate(parts) if parts else None               # pixels: a latent model's are decoded
    gathered = [mine_images]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine_images)
    if rank == 0:
        images = np.zeros((args.num, *gathered[0].shape[1:]), np.uint8)
        for r, part in enumerate(gathered):
            if part is not None:
                images[r::world] = part
        if args.npz:
            tmp = args.npz + '.tmp.npz'                            # np.savez adds .npz to other names
            try:
                np.savez(tmp, samples=images)
                os.replace(tmp, args.npz)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            print(f'wrote {args.num} images to {args.npz}')
        if args.grid:
            shown = images if args.num <= 256 else images[:64]
            data.save_grid(torch.from_numpy(shown).permute(0, 3, 1, 2).float() / 127.5 - 1, args.grid)
            print(f'wrote a grid of {len(shown)} of the {args.num} images to {args.grid}')


if __name__ == '__main__':
    cli.main_guard(main)
