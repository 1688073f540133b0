"""SD-VAE latents for sCM's ImageNet 512 runs (App. G.1), all of it: encode an image folder or zip, load what was
stored as a training set (normalized, its scale checked), decode (sampling a latent model), look at a file.

  python latents.py encode imagenet/train --out in512.npy             # class subfolders -> labels; ~1.3M images
  python latents.py decode in512.npy --grid in512.png -n 64            # decode the first 64 posterior means
  torchrun --nproc_per_node=8 train_teacher.py --size xl --data in512.npy

The pipeline, as the paper describes it where it does and as EDM2's dataset tool does where it does not:
  1. center crop and resize to --resolution (512) as ADM and EDM2 do for ImageNet (data.center_crop);
  2. pixels scaled to [-1, 1] (App. G.1 stresses this; EDM2's tool encodes [0, 1], which shifts the latents);
  3. `AutoencoderKL` of `stabilityai/sd-vae-ft-mse` from diffusers (an optional dependency, used only here and by
     sample.py to decode);
  4. stored, like EDM2, as the posterior's mean and std: <out> float32 [N, 8, R/8, R/8], <stem>.labels.npy, and
     <stem>.json (the VAE, the pixel range, and the per-channel mean and std to normalize with).
The paper is silent on whether training uses the posterior mean or samples; like EDM2, the loader draws a fresh
sample mean + std * eps for every batch (seeded by the step, so resume stays exact). Normalization is
(z - mean_c) * sigma_d / std_c with the paper's statistics for sd-vae-ft-mse; any other VAE (the tests' tiny one) gets
the statistics measured while encoding. Each file is written to a temporary name and renamed when complete, so an
interrupted encode leaves no partial file (the .json, which the loader reads first, is written last).
"""
import argparse
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import cli
import data

PAPER_VAE = 'stabilityai/sd-vae-ft-mse'         # sCM App. G.1
LATENT_MEAN = (1.56, -0.695, 0.483, 0.729)      # sCM App. G (ImageNet 512): per-channel stats of raw SD-VAE latents
LATENT_STD = (5.27, 5.91, 4.21, 4.31)           # latents are normalized as (z - mean) * sigma_d / std, sigma_d = 0.5
EDM2_MEAN = (5.81, 3.25, 0.12, -2.15)            # EDM2's StabilityVAEEncoder: the same VAE of [0, 1] pixels, its
EDM2_STD = (4.17, 4.62, 3.71, 3.28)              # raw_mean/raw_std (final std 0.5): what its ImageNet 512 nets learned


def _channel_stats(x, mean, std):
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return mean, std


def normalize(z, sigma_d=0.5, mean=LATENT_MEAN, std=LATENT_STD):
    """Raw SD-VAE latents [B,4,H,W] -> (z - mean) * sigma_d / std, per channel (sCM App. G.1)."""
    m, s = _channel_stats(z, mean, std)
    return (z - m) * (sigma_d / s)


def denormalize(x, sigma_d=0.5, mean=LATENT_MEAN, std=LATENT_STD):
    """Inverse of normalize: x * std / sigma_d + mean, ready for the SD-VAE decoder."""
    m, s = _channel_stats(x, mean, std)
    return x * (s / sigma_d) + m


# ---------------------------------------------------------------------------------------------------------------------
# The training set: <stem>.npy with optional <stem>.labels.npy, and <stem>.json where encode wrote it
# ---------------------------------------------------------------------------------------------------------------------

class LatentDataset(torch.utils.data.Dataset):
    """data.ImageDataset's interface over a memory-mapped float array: [N,4,H,W] raw latents, or [N,8,H,W] VAE
    posteriors (mean, std), from which every batch draws a fresh sample mean + std * eps, as EDM2 does; items come
    out normalized. `latent_stats`: the VAE and the normalization's mean and std."""
    is_latent = True
    files = None

    def __init__(self, name, latents, labels, num_classes, latent_stats):
        self.name, self.latents, self.labels, self.num_classes = name, latents, labels, num_classes
        self.shape = (4,) + tuple(latents.shape[2:])
        self.latent_stats = latent_stats

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.get_batch([i])[0][0], int(self.labels[i])

    def get_batch(self, indices, seed=None):
        """x [B,4,H,W] and labels [B]; seed: the posterior samples' noise (None draws from the global generator)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        z = torch.from_numpy(np.array(self.latents[idx.numpy()], dtype=np.float32))
        if z.shape[1] == 8:                                        # a posterior: sample it
            mean, std = z.chunk(2, dim=1)
            g = None if seed is None else torch.Generator().manual_seed(seed)
            z = mean + std * torch.randn(mean.shape, generator=g)
        return normalize(z, mean=self.latent_stats['mean'], std=self.latent_stats['std']), self.labels[idx]


def load(path):
    """encode's files: [N,8,H,W] posterior mean and std, with <stem>.json naming the VAE, the normalization's
    statistics and the class count. Without the .json: raw SD-VAE latents [N,4,H,W] of [-1, 1] pixels, normalized
    with the paper's. Labels from <stem>.labels.npy if present."""
    name, path = path, os.path.expanduser(os.fspath(path))
    try:
        z = np.load(path, mmap_mode='r')
    except (OSError, ValueError) as e:
        raise data.DataError(f'data: cannot read {path} as a .npy array ({e})') from None
    if z.ndim != 4 or z.dtype.kind != 'f':
        raise data.DataError(f'data: {path} holds a {z.dtype} array of shape {tuple(z.shape)}, expected float latents '
                        f'[N, 4, H, W]')
    stem = path[:-len('.npy')]
    stats, meta = dict(vae=PAPER_VAE, mean=LATENT_MEAN, std=LATENT_STD), {}
    if os.path.isfile(stem + '.json'):
        try:
            with open(stem + '.json') as f:
                meta = json.load(f)
            stats = dict(vae=str(meta['vae']), mean=tuple(map(float, meta['mean'])), std=tuple(map(float, meta['std'])),
                         pixels=str(meta.get('pixels', '[-1, 1]')))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise data.DataError(f'data: cannot read {stem}.json as latents.py\'s description of {path} '
                                 f'({e!r})') from None
        if z.shape[1] != 8 or len(stats['mean']) != 4 or len(stats['std']) != 4:
            raise data.DataError(f'data: {path} has {z.shape[1]} channels and {stem}.json {len(stats["mean"])} means; '
                            f'latents.py writes 8 (posterior mean and std of 4) and 4')
    elif z.shape[1] != 4:
        raise data.DataError(f'data: {path} has {z.shape[1]} channels; raw latents must have 4 channels (SD-VAE), '
                        f'shaped [N, 4, H, W] (or encode with latents.py, which writes a .json beside them)')
    label_path = stem + '.labels.npy'
    if os.path.isfile(label_path):
        try:
            y = np.load(label_path)
        except (OSError, ValueError) as e:
            raise data.DataError(f'data: cannot read {label_path} as a .npy array ({e})') from None
        if y.ndim != 1 or y.dtype.kind not in 'iu' or len(y) != len(z) or (y.size and y.min() < -1):
            raise data.DataError(f'data: {label_path} holds a {y.dtype} array of shape {tuple(y.shape)}, expected '
                            f'{len(z)} integer labels (>= 0, or -1 for none), one per latent in {path}')
        labels = torch.from_numpy(y.astype(np.int64))
        num_classes = int(meta.get('classes') or (y.max() + 1 if y.size and y.max() >= 0 else 0))
    else:
        labels, num_classes = torch.full((len(z),), -1, dtype=torch.long), 0
    ds = LatentDataset(name, z, labels, num_classes, stats)
    check_scale(ds, path)
    return ds


def check_scale(ds, path, n=256):
    """sCM's normalized latents have per-channel mean ~0 and std ~sigma_d = 0.5 (App. G.1). Latents of [0, 1] pixels
    (EDM2's dataset tool), of another VAE or already normalized do not: refuse them, so they do not silently train
    at the wrong scale. Checks n items spread over the file; non-finite values are left to the training loop."""
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(np.int64)
    x = ds.get_batch(idx, seed=0)[0].double().transpose(0, 1).reshape(4, -1)
    ok = torch.isfinite(x)
    cnt = ok.sum(1).clamp(min=1)
    mean = torch.where(ok, x, 0).sum(1) / cnt
    std = (torch.where(ok, x - mean[:, None], 0).square().sum(1) / cnt).sqrt()
    if (mean.abs() > 0.25).any() or (std < 0.3).any() or (std > 0.75).any():
        fmt = lambda v: '[' + ', '.join(f'{a:.2f}' for a in v.tolist()) + ']'
        raise data.DataError(f'data: {path}: normalized latents have per-channel mean {fmt(mean)} and std {fmt(std)}, '
                             f'but sCM\'s have mean ~0 and std ~0.5 (App. G.1): they were encoded another way '
                             f'(EDM2\'s dataset tool encodes [0, 1] pixels, sCM [-1, 1]); encode the images with '
                             f'`python latents.py encode`')


# ---------------------------------------------------------------------------------------------------------------------
# The SD-VAE: encode, decode
# ---------------------------------------------------------------------------------------------------------------------

def load_vae(name, device):
    """diffusers' AutoencoderKL by hub name or local folder, in eval mode; one clear line if that cannot be done."""
    try:
        from diffusers.models import AutoencoderKL                          # noqa: PLC0415 - optional dependency
    except ImportError:
        raise cli.UserError('the SD-VAE needs diffusers: `pip install diffusers` (only latents.py and the '
                            'decoding of latent models use it)') from None
    try:
        vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)   # no `accelerate` needed
    except (OSError, ValueError) as e:
        raise cli.UserError(f'cannot load the VAE {name!r} ({str(e).splitlines()[0]}); a hub name such as '
                            f'{PAPER_VAE} needs the network once, or a local folder saved by diffusers') from None
    return vae.to(device).eval().requires_grad_(False)


_vaes = {}


def get_vae(name, device):
    """load_vae, once per (name, device)."""
    key = (name, str(device))
    if key not in _vaes:
        _vaes[key] = load_vae(name, device)
    return _vaes[key]


@torch.no_grad()
def decode(x, stats, batch=16):
    """Normalized latents [B,4,h,w] -> pixels in [-1, 1], with the VAE and statistics named in `stats` (the dict a
    latent dataset and its checkpoints carry)."""
    vae = get_vae(stats['vae'], x.device)
    z = denormalize(x.float(), mean=stats['mean'], std=stats['std'])
    x = torch.cat([vae.decode(z[i:i + batch]).sample for i in range(0, len(z), batch)])
    return (x * 2 - 1 if stats.get('pixels') == '[0, 1]' else x).clamp(-1, 1)   # EDM2 encodes [0, 1] pixels


def _save_npy(path, array):
    tmp = path + '.tmp.npy'
    np.save(tmp, array)
    os.replace(tmp, path)


@torch.no_grad()
def encode(args):
    if not args.out.endswith('.npy'):
        raise cli.UserError(f'--out {args.out}: must end in .npy (the loader finds <stem>.json and <stem>.labels.npy)')
    if args.resolution < 8 or args.resolution % 8:
        raise cli.UserError(f'--resolution {args.resolution}: must be a positive multiple of 8 (the VAE '
                            f'downsamples 8x)')
    ds = None if args.images.endswith('.npy') else data.load_dataset(args.images, crop=args.resolution)
    if ds is None or ds.files is None:
        raise cli.UserError(f'{args.images}: encode takes an image folder or a .zip of images')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    vae_name = os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae
    vae = load_vae(vae_name, device)
    ds.shape = (3,) + ds.shape[1:]                                    # the VAE takes RGB: every image is converted
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers)
    stem, tmp, out = args.out[:-len('.npy')], args.out + '.tmp.npy', None
    s1 = s2 = 0                                                       # per-channel sums of E[z] and E[z^2]
    try:
        i = 0
        for x, _ in tqdm(loader, desc='encoding', unit='batch'):
            x = (x + 1) / 2 if args.like == 'edm2' else x               # EDM2: [0, 1]; sCM: [-1, 1] (App. G.1)
            post = vae.encode(x.to(device)).latent_dist
            mean, std = post.mean.float(), post.std.float()
            if out is None:
                shape = (len(ds), 8, *map(int, mean.shape[2:]))
                out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=shape)
            out[i:i + len(x)] = torch.cat([mean, std], dim=1).cpu().numpy()
            i += len(x)
            s1 = s1 + mean.double().sum((0, 2, 3))
            s2 = s2 + (mean.double().square() + std.double().square()).sum((0, 2, 3))
        out.flush()
        del out
        count = len(ds) * np.prod(mean.shape[2:])
        m = (s1 / count).cpu()
        sd = (s2 / count - m.square()).clamp(min=0).sqrt().cpu()
        measured = dict(mean=[round(v, 4) for v in m.tolist()], std=[round(v, 4) for v in sd.tolist()])
        paper = args.vae == PAPER_VAE
        known = (EDM2_MEAN, EDM2_STD, 'EDM2 (StabilityVAEEncoder)') if args.like == 'edm2' else \
            (LATENT_MEAN, LATENT_STD, 'sCM App. G.1')
        meta = dict(format='scm latents 1', vae=vae_name, images=os.path.abspath(args.images), count=len(ds),
                    classes=ds.num_classes,
                    resolution=args.resolution, crop='center (ADM / EDM2)',
                    pixels='[0, 1]' if args.like == 'edm2' else '[-1, 1]',
                    channels='posterior mean (4), then std (4)',
                    mean=list(known[0]) if paper else measured['mean'],
                    std=list(known[1]) if paper else measured['std'],
                    stats=known[2] if paper else 'measured while encoding', measured=measured)
        if ds.num_classes:
            _save_npy(stem + '.labels.npy', ds.labels.numpy())
        elif os.path.exists(stem + '.labels.npy'):
            os.remove(stem + '.labels.npy')                           # an older encoding's labels
        os.replace(tmp, args.out)
        with open(stem + '.json.tmp', 'w') as f:
            json.dump(meta, f, indent=1)
        os.replace(stem + '.json.tmp', stem + '.json')
    finally:
        for p in (tmp, stem + '.json.tmp', stem + '.labels.npy.tmp.npy'):
            if os.path.exists(p):
                os.remove(p)
    print(f'wrote {args.out}: {len(ds)} posteriors [{len(ds)}, 8, {mean.shape[2]}, {mean.shape[3]}]'
          + (f', {ds.num_classes} classes in {stem}.labels.npy' if ds.num_classes else ', no labels'))
    print(f'per-channel mean {measured["mean"]}, std {measured["std"]} measured'
          + (f'; normalizing with {meta["stats"]}\'s {meta["mean"]}, {meta["std"]}' if paper else
             '; normalizing with these (not the paper\'s VAE)'))
    load(args.out)                                                    # the loader's own check of the scale


@torch.no_grad()
def decode_file(args):
    if not args.latents.endswith('.npy'):
        raise cli.UserError(f'{args.latents}: not a .npy of latents')
    ds = load(args.latents)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    n = min(args.num, len(ds))
    z = torch.from_numpy(np.array(ds.latents[:n], dtype=np.float32))[:, :4]      # the posterior means (or raw z)
    x = normalize(z, mean=ds.latent_stats['mean'], std=ds.latent_stats['std']).to(device)
    data.save_grid(decode(x, ds.latent_stats).cpu(), args.grid)
    print(f'wrote the first {n} decoded latents of {args.latents} to {args.grid}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    e = sub.add_parser('encode', help='an image folder or .zip -> posterior .npy, .labels.npy and .json')
    e.add_argument('images', help='image folder (class subfolders give labels) or .zip')
    e.add_argument('--out', required=True, help='the .npy to write')
    e.add_argument('--resolution', type=int, default=512, help='center-crop size in pixels (ImageNet 512: 512)')
    e.add_argument('--vae', default=PAPER_VAE, help='diffusers AutoencoderKL: hub name or local folder')
    e.add_argument('--like', choices=['scm', 'edm2'], default='scm', help="scm: [-1, 1] pixels and sCM's statistics "
                   "(App. G.1); edm2: EDM2's encoding, [0, 1] pixels and its statistics, the data its ImageNet 512 "
                   "networks learned (to distill them)")
    e.add_argument('--batch', type=int, default=32, help='images per VAE call')
    e.add_argument('--workers', type=int, default=4, help='DataLoader processes decoding images')
    e.add_argument('--device', help='default: cuda if available, else cpu')
    d = sub.add_parser('decode', help='a grid of the first decoded latents of a .npy')
    d.add_argument('latents', help='.npy written by encode')
    d.add_argument('--grid', required=True, help='PNG to write')
    d.add_argument('-n', '--num', type=int, default=16, help='how many')
    d.add_argument('--device', help='default: cuda if available, else cpu')
    args = p.parse_args()
    for flag in ('batch', 'num'):
        if getattr(args, flag, 1) < 1:
            raise cli.UserError(f'--{flag} must be at least 1')
    if args.command == 'encode':
        encode(args)
    else:
        cli.check_output(args.grid)
        decode_file(args)


if __name__ == '__main__':
    cli.main_guard(main)
