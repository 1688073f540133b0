"""Check edm_pickle's conversion of EDM and EDM2 networks against NVlabs' own code (README, "Distilling EDM and EDM2
checkpoints"). Small random-weight networks are built by upstream's classes and pickled as its training loops pickle
them, read back through checkpoint.read_teacher (edm_pickle: the --teacher path), and compared: the denoiser
D(x, sigma), Heun samples against upstream's samplers, and EDM2's fp16 snapshots. Upstream (a non-commercial
licence) is imported from the given checkouts at run time, never copied.

  OMP_NUM_THREADS=1 python check_upstream.py --edm ../edm --edm2 ../edm2 [--out figures/upstream-conversion.txt]
"""
import argparse
import contextlib
import copy
import inspect
import math
import os
import pickle
import subprocess
import sys
import tempfile
import types

import torch

import checkpoint
import trigflow

SIGMAS = (0.002, 0.1, 1.0, 10.0, 80.0)
BATCH, SD = 8, 0.5                                  # batch; sigma_data of both upstream networks
SHARED = ('dnnlib', 'torch_utils', 'training', 'generate', 'generate_images')
INSERTED = []


def use_upstream(path):
    """Make `path` the checkout that `import dnnlib, torch_utils, training` finds (EDM and EDM2 share the names)."""
    for name in [n for n in sys.modules if n.split('.')[0] in SHARED]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p not in INSERTED]
    sys.path.insert(0, path)
    INSERTED.append(path)


def commit(path):
    r = subprocess.run(['git', '-C', path, 'rev-parse', 'HEAD'], capture_output=True, text=True)
    return r.stdout.strip()[:12] if r.returncode == 0 else 'unknown-commit'


def randomize(net, seed):
    """Random weights everywhere (upstream zero-initializes residual branches and output gains, which would hide
    the network behind c_skip x): weights ~ N(0, 1/fan_in), scales and gains ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_(1 + 0.2 * r if name.endswith(('weight', 'gain')) else 0.2 * r)
    return net


class Inner:
    """Upstream's inner network (EDM's net.model, EDM2's net.unet) under EDM's preconditioning (Karras et al. 2022,
    Table 1), run in x's dtype, or its input cast to `dtype` as EDM2's Precond does on CUDA with use_fp16. Needed
    because upstream's EDMPrecond/Precond cast x to fp32 on CPU. Has what upstream's samplers read of a network."""

    def __init__(self, net, inner, dtype=None):
        self.net, self.inner, self.dtype = net, inner, dtype
        self.sigma_min, self.sigma_max = getattr(net, 'sigma_min', 0), getattr(net, 'sigma_max', float('inf'))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        F = self.inner((x / (s ** 2 + SD ** 2).sqrt()).to(self.dtype or x.dtype), s.flatten().log() / 4, labels)
        return (SD ** 2 * x + s * SD * (s ** 2 + SD ** 2).sqrt() * F.to(x.dtype)) / (s ** 2 + SD ** 2)


@contextlib.contextmanager
def wide_vector_norm():
    """EDM2's normalize() asks vector_norm for fp32, which torch refuses for fp64 input: widen it for fp64 runs."""
    orig = torch.linalg.vector_norm
    torch.linalg.vector_norm = lambda x, *a, dtype=None, **k: orig(
        x, *a, dtype=dtype and torch.promote_types(dtype, x.dtype), **k)
    try:
        yield
    finally:
        torch.linalg.vector_norm = orig


def here(path, dtype):
    """This project's network of an upstream pickle, as train_scd.py --teacher loads it."""
    teacher = checkpoint.read_teacher(path)
    return checkpoint.load_teacher(teacher, teacher['model_kwargs']).to(dtype)


def D_here(net, x, sigma, labels, t64=False):
    """EDM's denoiser from the converted TrigFlow F: D = f(cos t x, t) (Eq. 23), as trigflow.sample_heun forms it.
    consistency_fn hands the network t in x's dtype; t64: in fp64 instead (to show what fp32 t costs)."""
    t = math.atan(sigma / SD)

    def F(u, tt):
        return net(u, torch.full_like(tt, t, dtype=torch.float64) if t64 else tt, labels)
    return trigflow.consistency_fn(F, math.cos(t) * x, t)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def compare(name, path, up, inner, sampler, steps, shape, label_dim, out):
    """D at every sigma and Heun samples, fp64 and fp32, upstream `up` against the conversion of its pickle."""
    g = torch.Generator().manual_seed(1)
    x0, latents = torch.randn((BATCH,) + shape, generator=g), torch.randn((BATCH,) + shape, generator=g)
    labels = torch.randint(0, label_dim, (BATCH,), generator=g) if label_dim else None
    for prec, dtype in (('fp64', torch.float64), ('fp32', torch.float32)):
        net, onehot = here(path, dtype), None if labels is None else torch.eye(label_dim, dtype=dtype)[labels]
        ref = Inner(up.double(), inner(up)) if dtype == torch.float64 else up.float()   # in place; exact
        with wide_vector_norm() if dtype == torch.float64 else contextlib.nullcontext():
            for s in SIGMAS:
                x = (x0 + s * latents).to(dtype)
                D_up = ref(x, torch.tensor(s), onehot)
                out(name, prec, 'D-maxrel', f'sigma={s:g}', rel(D_here(net, x, s, labels), D_up))
                if dtype == torch.float32:
                    out(name, 'fp32-t64', 'D-maxrel', f'sigma={s:g}', rel(D_here(net, x, s, labels, t64=True), D_up))
            kw = dict(dtype=dtype) if 'dtype' in inspect.signature(sampler).parameters else {}   # EDM2's sampler
            x_up = sampler(ref, latents.to(dtype), onehot, num_steps=steps, **kw)
        z = latents.to(dtype) * (trigflow.SIGMA_MAX * math.cos(trigflow.T_MAX))   # starts both at sigma_max latents
        x_here = trigflow.sample_heun(lambda u, t: net(u, t, labels), z, steps)
        out(name, prec, 'heun-maxabs', f'steps={steps}', (x_here.double() - x_up.double()).abs().max().item())


def check_edm(path, tmp, out):
    use_upstream(path)
    import generate
    from training import augment, loss, networks
    for label_dim in (0, 10):       # EDM's train.py --arch=ddpmpp --precond=edm (CIFAR-10), smaller
        up = randomize(networks.EDMPrecond(
            img_resolution=32, img_channels=3, label_dim=label_dim, use_fp16=False, model_type='SongUNet',
            embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
            resample_filter=[1, 1], model_channels=16, channel_mult=[2, 2, 2], num_blocks=2, dropout=0.13,
            augment_dim=9), seed=label_dim).eval().requires_grad_(False)
        pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        pkl = os.path.join(tmp, f'edm-{label_dim}.pkl')
        with open(pkl, 'wb') as f:   # as EDM's training_loop.py writes network-snapshot-*.pkl
            pickle.dump(dict(ema=copy.deepcopy(up), loss_fn=loss.EDMLoss(), augment_pipe=pipe,
                             dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x')), f)
        name = f'edm-ddpmpp-{"cond" + str(label_dim) if label_dim else "uncond"}'
        compare(name, pkl, up, lambda n: n.model, generate.edm_sampler, 18, (3, 32, 32), label_dim, out)


def check_edm2(path, tmp, out):
    use_upstream(path)
    if 'psutil' not in sys.modules:        # imported by training_loop (for EDM2Loss), unused here
        sys.modules['psutil'] = types.ModuleType('psutil')
    import dnnlib
    import generate_images
    from training import encoders, networks_edm2, training_loop
    for label_dim in (0, 1000):     # EDM2's Precond + UNet (train_edm2.py), smaller
        up = randomize(networks_edm2.Precond(
            img_resolution=16, img_channels=4, label_dim=label_dim, model_channels=32, channel_mult=[1, 2, 2],
            num_blocks=1, channels_per_head=16, dropout=0), seed=label_dim).eval().requires_grad_(False)
        name = f'edm2-unet-{"cond" + str(label_dim) if label_dim else "uncond"}'
        for snap, dtype in (('', torch.float32), ('-fp16snap', torch.float16)):
            data = dnnlib.EasyDict(encoder=encoders.StabilityVAEEncoder(), loss_fn=training_loop.EDM2Loss(),
                                   dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset'))
            data.ema = copy.deepcopy(up).cpu().eval().requires_grad_(False).to(dtype)  # as training_loop.py saves
            with open(os.path.join(tmp, f'{name}{snap}.pkl'), 'wb') as f:
                pickle.dump(data, f)
        compare(name, os.path.join(tmp, f'{name}.pkl'), up, lambda n: n.unet, generate_images.edm_sampler, 32,
                (4, 16, 16), label_dim, out)
        # The fp16 snapshot as generate_images.py runs it (weights left in fp16): on CPU its Precond keeps fp32
        # activations; on CUDA it casts the U-Net's input to fp16 (emulated here on CPU: Inner with dtype fp16).
        snap = copy.deepcopy(up).to(torch.float16)
        net = here(os.path.join(tmp, f'{name}-fp16snap.pkl'), torch.float32)
        g = torch.Generator().manual_seed(2)
        x0, n = torch.randn((BATCH, 4, 16, 16), generator=g), torch.randn((BATCH, 4, 16, 16), generator=g)
        labels = torch.randint(0, label_dim, (BATCH,), generator=g) if label_dim else None
        onehot = None if labels is None else torch.eye(label_dim)[labels]
        for how, ref in (('fp16snap-cpu', snap), ('fp16snap-fp16act', Inner(snap, snap.unet, torch.float16))):
            for s in SIGMAS:
                x = x0 + s * n
                out(name, how, 'D-maxrel', f'sigma={s:g}', rel(D_here(net, x, s, labels), ref(x, torch.tensor(s), onehot)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--edm', required=True, help='a checkout of github.com/NVlabs/edm')
    ap.add_argument('--edm2', required=True, help='a checkout of github.com/NVlabs/edm2')
    ap.add_argument('--out', default='figures/upstream-conversion.txt')
    args = ap.parse_args()
    for flag, path, f in (('--edm', args.edm, 'training/networks.py'), ('--edm2', args.edm2, 'training/networks_edm2.py')):
        if not os.path.isfile(os.path.join(path, f)):
            print(f'error: {flag} {path}: no {f} there (pass a checkout of NVlabs/{flag[2:]})')
            sys.exit(2)
    torch.set_num_threads(1)
    torch.manual_seed(0)                   # EDM2's MPFourier draws its buffers from the global generator
    lines = [f'# OMP_NUM_THREADS=1 python check_upstream.py --edm EDM --edm2 EDM2: NVlabs/edm {commit(args.edm)}, '
             f'NVlabs/edm2 {commit(args.edm2)}, torch {torch.__version__}, CPU, {torch.get_num_threads()} thread, '
             f'small random-weight networks pickled by upstream, read by checkpoint.read_teacher (edm_pickle)',
             f'# D-maxrel = max|D_upstream - D_here| / max|D_upstream| over a batch of {BATCH}; heun-maxabs = '
             'max|x_upstream - x_here|, upstream\'s sampler vs trigflow.sample_heun from the same noise; fp32-t64: the '
             'fp32 network given t in fp64; fp16snap-cpu / -fp16act: EDM2 fp16 snapshot run by upstream with fp32 / '
             'fp16 (as on CUDA, emulated) activations vs its weights in fp32 here']
    print('\n'.join(lines), flush=True)

    def out(*fields):
        lines.append(' '.join(fields[:-1]) + f' {fields[-1]:.2e}')
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        check_edm(os.path.abspath(args.edm), tmp, out)
        check_edm2(os.path.abspath(args.edm2), tmp, out)
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
