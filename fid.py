"""FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule"): Inception features, their statistics
and the Frechet distance, and a command line. The network and its weights are in inception.py.

  python fid.py stats fashion-mnist --split train -n 2000 --out ref.npz      # reference statistics ($SCM_DATA)
  python fid.py fid samples.npz ref.npz                      # samples (npz, folder, dataset) or stats, either side
  python fid.py checkpoint runs/scd-fashion-s/checkpoint.pt --ref ref.npz -n 10000 --steps 2
  torchrun --nproc_per_node=8 fid.py checkpoint ckpt.pt --ref ref.npz -n 50000         # sharded generation
  python fid.py noise fashion-mnist --split test -n 1000 --sigmas 0 0.05 0.1 0.2    # sanity check: FID grows

Preprocessing (inception_input): uint8 [N,H,W,C] -> float, grayscale repeated to RGB, bilinear resize to 299x299
(align_corners=False, as pytorch-fid), then (x - 128) / 128: the input node of the TF graph. pytorch-fid instead uses
x / 127.5 - 1, which differs by at most 0.008 per pixel; FIDs are comparable only between statistics made with the same
convention, so every stats file records it (key 'preprocess') and `fid` warns when two differ.
-n N always takes the FIRST N images of a source (npz order, sorted file paths, or the dataset's file order).
"""
import argparse
import functools
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import inception
import sample

PREPROCESS = 'tf-2015-12-05: bilinear 299 align_corners=False, (x - 128) / 128'


class FIDError(data.DataError):
    """A bad FID input (images, stats): one line naming the path; the command line prints it as an `error:` line."""


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and features.


def inception_input(images, device=None):
    """uint8 images [N,H,W,C] (C = 1 or 3; numpy or torch) -> float32 [N,3,299,299] as the weights expect: bilinear
    resize with align_corners=False (pytorch-fid's resize_input, no antialiasing), then (x - 128) / 128, the Sub/Mul
    input nodes of the TF graph (what TTUR's original FID code computes from uint8 images): 0 -> -1, 255 -> 0.9921875.
    pytorch-fid's x / 127.5 - 1 differs slightly, so never mix statistics made the two ways."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f'inception_input takes uint8 images [N, H, W, C] with C = 1 or 3, got {x.dtype} '
                         f'{tuple(x.shape)}')
    x = x.to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    return (x - 128) / 128


@torch.no_grad()
def features_of(images, model, batch=100, progress=True):
    """pool3 features, float64 numpy [N, 2048], of uint8 images [N,H,W,C], `batch` at a time on the model's device.
    On CUDA the convolutions run in full fp32 (TF32 off for the duration), so features do not depend on the GPU."""
    device = next(model.parameters()).device
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = [model(inception_input(images[i:i + batch], device).contiguous(memory_format=torch.channels_last))
               .double().cpu()
               for i in tqdm(range(0, len(images), batch), desc='inception', disable=not progress)]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.cat(out).numpy() if out else np.zeros((0, 2048))


# ---------------------------------------------------------------------------------------------------------------
# Statistics and the Frechet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982):
#   d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2).
# S1 S2 has the eigenvalues of the symmetric PSD M = S1^(1/2) S2 S1^(1/2) (AB and BA share eigenvalues), so
# tr (S1 S2)^(1/2) = sum sqrt(eig(M)), from eigh/eigvalsh in float64: no complex sqrtm, valid for singular S1, S2
# (fewer images than 2048). Eigenvalues below M's rounding level D eps max|ev| count as 0: with N < D images, M has
# D - N + 1 zero eigenvalues that come out as +-1e-14, whose square roots would add up (FID(x, x) = -2e-4 at N = 20).


def stats(features):
    """(mu, sigma) of features [N, D] in float64: the mean and the unbiased (N - 1) covariance, as pytorch-fid."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise FIDError(f'statistics need features [N >= 2, D], got shape {f.shape}')
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet distance between two Gaussians (numpy or torch inputs), computed in float64: a float."""
    def f64(a):
        return torch.as_tensor(np.asarray(a.cpu() if torch.is_tensor(a) else a), dtype=torch.float64)
    mu1, mu2, s1, s2 = f64(mu1).reshape(-1), f64(mu2).reshape(-1), f64(sigma1), f64(sigma2)
    D = mu1.numel()
    if mu2.numel() != D or s1.shape != (D, D) or s2.shape != (D, D):
        raise FIDError(f'statistics do not match: mu {mu1.numel()} vs {mu2.numel()}, sigma {tuple(s1.shape)} vs '
                       f'{tuple(s2.shape)}')
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, V = torch.linalg.eigh(s1)
    root1 = (V * w.clamp(min=0).sqrt()) @ V.T                   # S1^(1/2)
    ev = torch.linalg.eigvalsh(root1 @ s2 @ root1)
    tol = ev.abs().max() * D * torch.finfo(torch.float64).eps  # rounding level of M's eigenvalues (numpy's rank tol)
    tr_covmean = torch.where(ev > tol, ev, 0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------------------------
# Sources of images and statistics.


def load_images(source, num=None, split='train', data_dir=None):
    """The first `num` (default all) images of a source as uint8 numpy [N,H,W,C]: an .npz of samples (key 'samples',
    as sample.py writes; 'arr_0' as guided-diffusion writes), or anything data.load_dataset reads: a dataset name
    (split, data_dir apply), an image folder or a .zip of images."""
    source = os.fspath(source)
    if source.endswith('.npz'):
        try:
            with np.load(os.path.expanduser(source)) as f:
                key = 'samples' if 'samples' in f.files else 'arr_0' if 'arr_0' in f.files else None
                if key is None:
                    raise FIDError(f'{source} has no "samples" array (keys: {", ".join(f.files)})')
                images = f[key]
        except (OSError, ValueError) as e:
            raise FIDError(f'cannot read {source} as an .npz ({e})') from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise FIDError(f'{source}: "{key}" is {images.dtype} {images.shape}, expected uint8 [N, H, W, C] with '
                           f'C = 1 or 3')
        if len(images) < max(num or 0, 2):
            raise FIDError(f'{source} holds {len(images)} images, fewer than ' + (f'--num {num}' if num else '2'))
        return images[:num]
    ds = data.load_dataset(source, data_dir, split)
    n = len(ds) if num is None else num
    if len(ds) < n:
        raise FIDError(f'{source} holds {len(ds)} images, fewer than --num {num}')
    if ds.images is not None:                                   # named datasets: uint8 [N,C,H,W] in memory
        return ds.images[:n].permute(0, 2, 3, 1).numpy()
    ds.shape = (3,) + ds.shape[1:]           # files: each image converted to RGB on its own, as pytorch-fid does
    chunks = [data.to_uint8(ds.get_batch(range(i, min(i + 256, n)))[0])  # files: [-1, 1] -> round((x + 1) 127.5)
              for i in tqdm(range(0, n, 256), desc=f'reading {source}')]
    return np.concatenate(chunks)


def save_stats(path, mu, sigma, num):
    tmp = path + '.tmp.npz'                                     # np.savez adds .npz to names without it
    np.savez(tmp, mu=mu, sigma=sigma, num=num, preprocess=np.array(PREPROCESS))
    os.replace(tmp, path)


def stats_of(spec, args, get_model):
    """(mu, sigma, preprocess tag or None) of a stats .npz (ours, or pytorch-fid's with keys mu and sigma), else of
    the first --num images of a source."""
    path = os.path.expanduser(os.fspath(spec))
    if path.endswith('.npz') and os.path.isfile(path):
        try:
            with np.load(path) as f:
                if 'mu' in f.files and 'sigma' in f.files:
                    return f['mu'], f['sigma'], str(f['preprocess']) if 'preprocess' in f.files else None
        except (OSError, ValueError) as e:
            raise FIDError(f'cannot read {spec} as an .npz ({e})') from None
    images = load_images(spec, args.num, args.split, args.data_dir)
    print(f'{spec}: {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}', file=sys.stderr)
    return (*stats(features_of(images, get_model(), args.batch)), PREPROCESS)


def warn_mismatch(a, b, where='the second statistics'):
    """Warn when two statistics were made differently, or when one does not say how (e.g. pytorch-fid's files)."""
    if a != b:
        what = f'{a!r} vs {b!r}' if a and b else f'{where if not b else "the first statistics"} do not record it'
        print(f'warning: statistics made with different or unknown preprocessing ({what}); FIDs are comparable only '
              f'between statistics made with the same Inception weights and preprocessing', file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Commands.


def cmd_stats(args, get_model):
    images = load_images(args.source, args.num, args.split, args.data_dir)
    mu, sigma = stats(features_of(images, get_model(), args.batch))
    save_stats(args.out, mu, sigma, len(images))
    print(f'wrote the statistics of {len(images)} images of {args.source} to {args.out}')


def cmd_fid(args, get_model):
    mu1, s1, p1 = stats_of(args.a, args, get_model)
    mu2, s2, p2 = stats_of(args.b, args, get_model)
    warn_mismatch(p1, p2, args.b)
    print(f'{frechet_distance(mu1, s1, mu2, s2):.4f}')


def cmd_noise(args, get_model):
    """FID between the first --num images and the same images plus N(0, sigma^2) noise in [-1, 1] units, clipped
    and re-quantized (round((x + 1) 127.5)). Should start at ~0 for sigma 0 and grow with sigma."""
    images = load_images(args.source, args.num, args.split, args.data_dir)
    model = get_model()
    mu0, s0 = stats(features_of(images, model, args.batch))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    for sigma in args.sigmas:
        g = torch.Generator().manual_seed(args.seed)
        noisy = data.to_uint8(x + sigma * torch.randn(x.shape, generator=g))
        mu, s = stats(features_of(noisy, model, args.batch))
        print(f'sigma {sigma:g}  FID {frechet_distance(mu0, s0, mu, s):.4f}', flush=True)


def cmd_checkpoint(args, get_model):
    """FID of --num samples of a checkpoint against --ref: each rank draws its share with sample.py's sampler (image i
    from noise seed (--seed, i)) and embeds it; rank 0 gathers the features."""
    rank, world, device = cli.init_distributed()
    net, ckpt = sample.load_net(args.checkpoint, args.raw, device)
    sample.check_args(args, ckpt)
    model = get_model(device)
    ref = stats_of(args.ref, args, get_model) if rank == 0 else None      # a bad --ref fails before the sampling
    feats = [features_of(x, model, args.batch, progress=False).astype(np.float32) for x in
             sample.image_batches(net, ckpt, list(range(rank, args.num, world)), args, device,
                                  desc='sampling + inception', progress=rank == 0)]
    feats = np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, feats)
        feats = np.concatenate(gathered)
    if rank == 0:
        mu_r, s_r, p_r = ref
        warn_mismatch(PREPROCESS, p_r, args.ref)
        what = 'heun' if ckpt['method'] == 'teacher' or args.sampler == 'heun' else f'ts {args.ts}' if args.ts \
            else f'{args.steps}-step'
        print(f'{args.checkpoint} ({what}, {len(feats)} samples) vs {args.ref}', file=sys.stderr)
        print(f'{frechet_distance(*stats(feats), mu_r, s_r):.4f}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    # -n as well: under torchrun on Python 3.11, torchrun's parser takes --num for an abbreviation of --numa-binding
    common.add_argument('-n', '--num', type=int, default=None, help='the first N images of each source (default all)')
    common.add_argument('--split', choices=['train', 'test'], default='train', help='split of a named dataset')
    common.add_argument('--data-dir', default=None, help='named datasets live here (default $SCM_DATA or ~/.cache/scm)')
    common.add_argument('--inception', default=None, help='Inception weights: a file or folder (see inception.py)')
    common.add_argument('--batch', type=int, default=100, help='images per batch (sampling and Inception)')
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('stats', parents=[common], help='write the statistics of a source to --out')
    s.add_argument('source', help='a dataset name, an image folder, a .zip or an .npz of samples')
    s.add_argument('--out', required=True, help='the statistics .npz to write')
    s = sub.add_parser('fid', parents=[common], help='FID between two sources or stats files')
    s.add_argument('a', help='a stats .npz, or a source of images')
    s.add_argument('b', help='a stats .npz, or a source of images')
    s = sub.add_parser('noise', parents=[common], help='sanity check: FID of a source vs itself plus noise')
    s.add_argument('source', help='a source of images')
    s.add_argument('--sigmas', type=float, nargs='+', default=[0.0, 0.05, 0.1, 0.2], help='noise levels in [-1, 1] units')
    s.add_argument('--seed', type=int, default=0, help='seed of the noise')
    s = sub.add_parser('checkpoint', parents=[common], help='FID of samples of a checkpoint vs --ref')
    s.add_argument('checkpoint', help='checkpoint.pt of a training script')
    s.add_argument('--ref', required=True, help='reference stats .npz (or a source: its first --num images)')
    sample.add_sampler_args(s, batch=False)
    args = p.parse_args()
    if args.num is not None and args.num < 1 or args.batch < 1:
        raise FIDError('-n/--num and --batch must be at least 1')
    if args.command == 'checkpoint' and not args.num:
        raise FIDError('checkpoint needs --num N samples')

    default_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    get_model = functools.cache(lambda device=None: inception.load_inception(args.inception, device or default_device))
    needs_weights = not (args.command == 'fid' and all(str(s).endswith('.npz') for s in (args.a, args.b)))
    if needs_weights and (args.inception or inception.default_weights(download=False)):
        get_model()                    # weights on disk: read and checked before any work (a download waits)
    {'stats': cmd_stats, 'fid': cmd_fid, 'noise': cmd_noise, 'checkpoint': cmd_checkpoint}[args.command](
        args, get_model)


if __name__ == '__main__':
    cli.main_guard(main)
