"""SD-VAE latents for sCM's ImageNet 512 runs (App. G.1): encode an image folder or zip, and look at what was stored.

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

import data
import train_util as tu


def load_vae(name, device):
    """diffusers' AutoencoderKL by hub name or local folder, in eval mode; one clear line if that cannot be done."""
    try:
        from diffusers.models import AutoencoderKL                          # noqa: PLC0415 - optional dependency
    except ImportError:
        raise tu.UserError('the SD-VAE needs diffusers: `pip install diffusers` (only latents.py and the decoding '
                           'of latent models use it)') from None
    try:
        vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)   # no `accelerate` needed
    except (OSError, ValueError) as e:
        raise tu.UserError(f'cannot load the VAE {name!r} ({str(e).splitlines()[0]}); a hub name such as '
                           f'{data.PAPER_VAE} needs the network once, or a local folder saved by diffusers') from None
    return vae.to(device).eval().requires_grad_(False)


_vaes = {}


@torch.no_grad()
def decode(x, stats, batch=16):
    """Normalized latents [B,4,h,w] -> pixels in [-1, 1], with the VAE and statistics named in `stats` (the dict a
    latent dataset and its checkpoints carry)."""
    key = (stats['vae'], str(x.device))
    if key not in _vaes:
        _vaes[key] = load_vae(stats['vae'], x.device)
    z = data.denormalize_latents(x.float(), mean=stats['mean'], std=stats['std'])
    return torch.cat([_vaes[key].decode(z[i:i + batch]).sample for i in range(0, len(z), batch)]).clamp(-1, 1)


def _save_npy(path, array):
    tmp = path + '.tmp.npy'
    np.save(tmp, array)
    os.replace(tmp, path)


@torch.no_grad()
def encode(args):
    if not args.out.endswith('.npy'):
        raise tu.UserError(f'--out {args.out}: must end in .npy (the loader finds <stem>.json and <stem>.labels.npy)')
    if args.resolution < 8 or args.resolution % 8:
        raise tu.UserError(f'--resolution {args.resolution}: must be a positive multiple of 8 (the VAE downsamples 8x)')
    ds = data.load_dataset(args.images, crop=args.resolution)
    if ds.is_latent or ds.files is None:
        raise tu.UserError(f'{args.images}: encode takes an image folder or a .zip of images')
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
            post = vae.encode(x.to(device)).latent_dist               # x in [-1, 1] (App. G.1)
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
        paper = args.vae == data.PAPER_VAE
        meta = dict(format='scm latents 1', vae=vae_name, images=os.path.abspath(args.images), count=len(ds),
                    resolution=args.resolution, crop='center (ADM / EDM2)', pixels='[-1, 1]',
                    channels='posterior mean (4), then std (4)',
                    mean=list(data.LATENT_MEAN) if paper else measured['mean'],
                    std=list(data.LATENT_STD) if paper else measured['std'],
                    stats='sCM App. G.1' if paper else 'measured while encoding', measured=measured)
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
          + (f'; normalizing with the paper\'s {list(data.LATENT_MEAN)}, {list(data.LATENT_STD)}' if paper else
             '; normalizing with these (not the paper\'s VAE)'))
    data.load_dataset(args.out)                                       # the loader's own check of the scale


@torch.no_grad()
def decode_file(args):
    ds = data.load_dataset(args.latents)
    if not ds.is_latent:
        raise tu.UserError(f'{args.latents}: not a .npy of latents')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    n = min(args.num, len(ds))
    z = torch.from_numpy(np.array(ds.latents[:n], dtype=np.float32))[:, :4]      # the posterior means (or raw z)
    x = data.normalize_latents(z, mean=ds.latent_stats['mean'], std=ds.latent_stats['std']).to(device)
    data.save_grid(decode(x, ds.latent_stats).cpu(), args.grid)
    print(f'wrote the first {n} decoded latents of {args.latents} to {args.grid}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    e = sub.add_parser('encode', help='an image folder or .zip -> posterior .npy, .labels.npy and .json')
    e.add_argument('images', help='image folder (class subfolders give labels) or .zip')
    e.add_argument('--out', required=True, help='the .npy to write')
    e.add_argument('--resolution', type=int, default=512, help='center-crop size in pixels (ImageNet 512: 512)')
    e.add_argument('--vae', default=data.PAPER_VAE, help='diffusers AutoencoderKL: hub name or local folder')
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
            raise tu.UserError(f'--{flag} must be at least 1')
    if args.command == 'encode':
        encode(args)
    else:
        import sample                                                 # noqa: PLC0415
        sample.check_output(args.grid)
        decode_file(args)


if __name__ == '__main__':
    tu.main_guard(main)
