"""Plain functions the three training scripts (train_teacher.py, train_sct.py, train_scd.py) share: the data and
networks of a run, the data stream, the learning rate, EMA, and the pieces of a step (gradient sync, precision, the
non-finite check, stop signals, grids). Nothing here owns the loop: each script holds its own, top to bottom.
Errors and exit codes are in cli.py, the command line in train_args.py, the run folder and checkpoints in
checkpoint.py, the method in trigflow.py.

Exact resume: every random draw of a step (data order, t, z, dropout, label dropout) comes from generators seeded by
(seed, step, micro-batch, rank), so a run resumed from a checkpoint repeats bit for bit what an uninterrupted run
does; no RNG state needs saving. Checkpoints are written to a temporary file and renamed, never torn.
"""
import contextlib
import hashlib
import math
import os
import resource
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

import cli
from checkpoint import step_seed
import data
import latents
import model
import trigflow as tf


def note_cpu_precision(args, device, rank):
    """One line when a GPU preset's fp16/bf16 autocast runs on a CPU, where it is emulated and crawls (10x or more
    slower than fp32; README: Install)."""
    if device.type == 'cpu' and args.precision != 'fp32' and rank == 0:
        print(f'note: --precision {args.precision} on a CPU is emulated, 10x or more slower than fp32; for a CPU run '
              f'pass --precision fp32', file=sys.stderr)


def micro_batches(args, world, n):
    """(batch per micro-batch, micro-batches per step) on each of `world` processes, for a dataset of n items."""
    if args.batch % world:
        raise cli.UserError(f'--batch {args.batch} is not divisible by the {world} processes')
    batch_gpu = args.batch_gpu or args.batch // world
    if (args.batch // world) % batch_gpu:
        raise cli.UserError(f'--batch-gpu {batch_gpu} must divide the per-process batch {args.batch // world}')
    batch_indices(n, batch_gpu, 0, world, args.seed, 0)                  # too small a dataset: fail now
    return batch_gpu, args.batch // world // batch_gpu


def load_data_all_ranks(args, rank, world):
    """The training set (SD-VAE latents if a .npy); under DDP rank 0 downloads what is missing while the others wait."""
    if world > 1 and rank != 0:
        dist.barrier()
    if args.data.endswith('.npy'):
        dataset = latents.load(args.data)
    else:
        dataset = data.load_dataset(args.data, args.data_dir, 'train', download=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    return dataset


def teacher_attention_axis(teacher):
    """'channels' for a U-Net teacher (read by checkpoint.read_teacher) from before the attention fix, whose attention ran
    across channels (the bug model._with_defaults describes): its student starts as exactly it only with the same
    layout. Else 'pixels'."""
    kw = teacher['model_kwargs'] if teacher else {}
    return model._with_defaults(kw)['attention_axis'] if kw.get('arch') == 'unet' else 'pixels'


def model_kwargs_for(args, dataset, teacher=None, dropout_everywhere=False):
    """Architecture of the run: a U-Net or DiT preset, checked against the data's shape and labels. teacher: the
    file checkpoint.read_teacher read, whose attention layout a U-Net student keeps (teacher_attention_axis).
    dropout_everywhere: dropout in every U-Net block, as EDM2's (the teachers are EDM2 config G, sCM App. G.1);
    else the preset's dropout_res (consistency models: resolutions <= 16 on ImageNet, App. G.2)."""
    C, H, W = dataset.shape
    if args.model in model.UNET_PRESETS or args.model in model.DDPMPP_PRESETS:
        arch = 'unet' if args.model in model.UNET_PRESETS else 'ddpmpp'
        kw = dict(model.UNET_PRESETS.get(args.model) or model.DDPMPP_PRESETS[args.model], arch=arch)
        want = (kw['img_channels'], kw['img_resolution'], kw['img_resolution'])
        if arch == 'unet':        # EDM2's attention over pixels; a student keeps a teacher's from before the fix
            kw['attention_axis'] = teacher_attention_axis(teacher)
    elif args.model in model.DIT_PRESETS:
        kw = dict(model.DIT_PRESETS[args.model], arch='dit', input_size=H, in_channels=C, patch_size=2,
                  label_dim=dataset.num_classes)
        want = (C, H, W)
    else:
        raise cli.UserError(f'--model {args.model!r} is not in model.UNET_PRESETS, DDPMPP_PRESETS or DIT_PRESETS')
    if tuple(dataset.shape) != want:
        raise cli.UserError(f'{dataset.name} has items of shape {"x".join(map(str, dataset.shape))} (CxHxW) but '
                            f'model {args.model!r} expects {"x".join(map(str, want))}; pick a matching '
                            f'--model/--preset')
    label_dim = kw['label_dim']
    if label_dim and not dataset.num_classes:
        raise cli.UserError(f'model {args.model!r} is class-conditional ({label_dim} classes) but {dataset.name} '
                            f'has no labels')
    if label_dim and dataset.num_classes > label_dim:       # fewer is fine: a run on part of ImageNet's classes
        raise cli.UserError(f'{dataset.name} has {dataset.num_classes} classes (labels 0..'
                            f'{dataset.num_classes - 1}) but model {args.model!r} takes labels 0..{label_dim - 1}')
    kw['dropout'] = args.dropout
    if dropout_everywhere and kw['arch'] == 'unet':
        kw['dropout_res'] = kw['img_resolution']
    return kw


# ---------------------------------------------------------------------------------------------------------------
# Seeds and the data stream: a function of (seed, step, rank), so resuming repeats it exactly.


def batch_indices(n, batch_gpu, rank, world, seed, micro):
    """Indices of global micro-batch number `micro` for this rank: epochs are seeded permutations of the data."""
    per_epoch = n // (batch_gpu * world)
    if per_epoch == 0:
        raise cli.UserError(f'the dataset has {n} items, fewer than one global micro-batch ({batch_gpu} x {world})')
    epoch, i = divmod(micro, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = (i * world + rank) * batch_gpu
    return perm[start:start + batch_gpu]


class _Batches(torch.utils.data.Dataset):
    """Micro-batch number m -> (x, labels), for a DataLoader that decodes lazily stored data in workers."""

    def __init__(self, dataset, batch_gpu, rank, world, seed):
        self.dataset, self.args = dataset, (batch_gpu, rank, world, seed)

    def __len__(self):
        return 1 << 62

    def __getitem__(self, m):
        return get_micro_batch(self.dataset, *self.args, m)


def get_micro_batch(dataset, batch_gpu, rank, world, seed, micro):
    """Global micro-batch number `micro`, this rank's share; a latent posterior's noise is seeded by it as well."""
    idx = batch_indices(len(dataset), batch_gpu, rank, world, seed, micro).tolist()
    return dataset.get_batch(idx, seed=step_seed(seed, micro, -1, rank))


def data_stream(dataset, batch_gpu, rank, world, seed, start_micro, workers):
    """Yield micro-batches (x0, labels) from number start_micro on."""
    if workers == 0:
        m = start_micro
        while True:
            yield get_micro_batch(dataset, batch_gpu, rank, world, seed, m)
            m += 1
    loader = torch.utils.data.DataLoader(_Batches(dataset, batch_gpu, rank, world, seed), batch_size=None,
                                         sampler=range(start_micro, 1 << 62), num_workers=workers,
                                         persistent_workers=True)
    yield from loader


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, learning rate and EMA.


def optimizer(args, params):
    Opt = torch.optim.RAdam if args.optimizer == 'radam' else torch.optim.Adam
    return Opt(params, lr=args.lr, betas=tuple(args.betas), eps=args.eps)


def learning_rate(args, step):
    """EDM2's schedule (EDM2 Eq. 67 with rampup): alpha_ref / sqrt(max(k / t_ref, 1)), linear rampup over the first
    lr_rampup_mimg million images."""
    lr = args.lr
    if args.lr_decay_steps > 0:
        lr /= math.sqrt(max((step + 1) / args.lr_decay_steps, 1))
    if args.lr_rampup_mimg > 0:
        lr *= min((step + 1) * args.batch / (args.lr_rampup_mimg * 1e6), 1)
    return lr


def power_ema_exponent(std):
    """gamma of EDM2's power-function EMA for a relative std sigma_rel (EDM2 Eq. 3/Alg. 2): the largest root of
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0."""
    tmp = std ** -2
    return float(np.roots([1, 7, 16 - tmp, 12 - tmp]).real.max())


def ema_beta(args, step, batch):
    """EMA decay after `step` optimizer steps (step >= 1)."""
    if args.ema_std:                                        # EDM2: beta = (1 - 1/k)^(gamma + 1)
        return (1 - 1 / step) ** (power_ema_exponent(args.ema_std) + 1)
    halflife = min(args.ema_halflife_mimg * 1e6, step * batch * 0.05)   # EDM: half-life with a 5% rampup ratio
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()



def update_ema(ema, net, beta):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)


# ---------------------------------------------------------------------------------------------------------------
# Inside the loop: gradient sync, precision, the non-finite check, logs, grids.


def no_sync(modules, skip):
    """DDP's no_sync on every wrapped module while skip is true (all but the last micro-batch of a step)."""
    stack = contextlib.ExitStack()
    for m in modules:
        if skip and hasattr(m, 'no_sync'):
            stack.enter_context(m.no_sync())
    return stack


def autocast(device, precision):
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == 'bf16' else torch.float16)


@contextlib.contextmanager
def eval_mode(module):
    """module in eval mode (dropout off) inside the block, its own mode after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def grad_norms(opt, drop_nonfinite=False):
    """{term: gradient norm} of each parameter group ('grad_norm' unless the group names its own 'term', as sCD +
    aVSD's F_phi does). drop_nonfinite (fp16): a non-finite norm is left out, since the GradScaler skips that step
    and backs off by itself."""
    out = {}
    for g in opt.param_groups:
        grads = [p.grad for p in g['params'] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in grads]))
            if not (drop_nonfinite and not torch.isfinite(norm)):
                out[g.get('term', 'grad_norm')] = norm
    return out


_SIGNAL = []                                                        # the stop signals received


def stop_on_signals():
    """Preemption (SLURM and torchrun send SIGTERM before a kill) and Ctrl-C: note the signal; the loop finishes its
    step, writes a checkpoint and exits with code 4. A second signal kills at once."""
    def note(signum, frame):
        if _SIGNAL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _SIGNAL.append(signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, note)


def check_step_all_ranks(terms, device, world):
    """(names of the terms that hold a NaN or Inf, whether to stop for a signal), the same on every rank: one
    all-reduce agrees on both, so that no rank waits for one that has stopped."""
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    flags = torch.tensor([float(bool(bad)), float(bool(_SIGNAL))], device=device)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bad or (['(on another rank)'] if flags[0].item() else []), bool(flags[1].item())


def interrupted(step, ckpt_path):
    return cli.Interrupted(f'{", ".join(_SIGNAL) or "a signal on another rank"} after step {step}; the checkpoint '
                       f'{ckpt_path} holds it: pass --resume to continue exactly')


def nonfinite_message(step, terms, bad, x0, ckpt_path, saved_step):
    """One line for a stopped run: step counted as the log counts (the first step is 1), what was non-finite, the
    likely cause, and where the last good state is."""
    names = ', '.join(f'{k}={float(terms[k]):.4g}' if k in terms else k for k in bad)
    last = (f'the last checkpoint, {ckpt_path}, is from step {saved_step}' if saved_step is not None
            else 'no checkpoint was written yet')
    if not torch.isfinite(x0).all():
        hint = 'the training data holds NaN or Inf values (this batch); clean the dataset'
    elif 'dxdt_rms' in bad:
        hint = "the teacher's velocity is non-finite; check the --teacher checkpoint"
    else:
        hint = 'lower --lr, use --precision fp32, or pass --on-nonfinite skip'
    return f'step {step}: non-finite {names}; {hint}; {last}'


def peak_mem_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB


def grid_inputs(dataset, label_dim, device):
    """Fixed noise (seed 12345) and labels for the sample grids: 64 images up to 64x64, else 16."""
    C, H, W = dataset.shape
    n = 64 if H <= 64 else 16
    z = torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(12345)) * tf.SIGMA_D
    labels = (torch.arange(n) % dataset.num_classes).to(device) if label_dim else None
    return z.to(device), labels


def grids_decodable(dataset, device):
    """Whether sample grids can be shown: pixels always; latents when the VAE they were encoded with loads (diffusers
    and the weights at hand), else one note and no grids, rather than sampling them to throw away."""
    if not dataset.is_latent:
        return True
    try:
        latents.get_vae(dataset.latent_stats['vae'], device)
        return True
    except cli.UserError as e:
        print(f'note: no sample grids: they would be latents, and {e}')
        return False


def save_grids(out, step, dataset, images):
    """{sampler name: images in [-1, 1] or latents} -> <out>/samples/<step>-<name>.png (latents decoded by the VAE)."""
    for name, x in images.items():
        x = latents.decode(x.float(), dataset.latent_stats) if dataset.is_latent else x.float().clamp(-1, 1)
        data.save_grid(x.cpu(), os.path.join(out, 'samples', f'{step:07d}-{name}.png'))


def report_weights_all_ranks(net, rank, world):
    """Print the sha256 of the raw weights; under DDP, one per rank, which must all be the same."""
    h = hashlib.sha256()
    for v in net.state_dict().values():
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        if rank == 0:
            print(f'weights sha256 per rank (DDP keeps them identical): {[d[:16] for d in digests]}; '
                  f'identical: {len(set(digests)) == 1}')
    else:
        print(f'weights sha256: {digest[:16]} (a fingerprint: the same run repeated or resumed gives the same)')
