"""Plain functions the three training scripts (train_teacher.py, train_sct.py, train_scd.py) share: the command line
with presets, the data stream, checkpoints and resume, the learning rate, EMA, the non-finite check, logging and
sample grids. Nothing here owns the loop: each script holds its own, top to bottom. The method is in trigflow.py.

Exact resume: every random draw of a step (data order, t, z, dropout, label dropout) comes from generators seeded by
(seed, step, micro-batch, rank), so a run resumed from a checkpoint repeats bit for bit what an uninterrupted run
does; no RNG state needs saving. Checkpoints are written to a temporary file and renamed, never torn.
"""
import argparse
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model
import trigflow as tf


class UserError(Exception):
    """A problem with the command line or the inputs, reported in one line (exit code 2)."""


class NonFiniteError(Exception):
    """A NaN or Inf in the loss, one of its terms or the gradient (exit code 3)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT: the run finished its step and wrote a checkpoint (exit code 4)."""


def main_guard(main):
    """Run main(); print user errors as one `error:` line and exit 2; a stopped non-finite run exits 3, a run stopped
    by a signal 4, a program interrupted outside a training loop 130."""
    try:
        main()
        if dist.is_initialized():
            dist.barrier()          # every rank done with its collectives before any tears the group down
    except (UserError, data.DataError) as e:
        _close_bars()
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        _close_bars()
        print(f'stopped: {e}', file=sys.stderr)
        sys.exit(3)
    except Interrupted as e:
        _close_bars()
        print(f'interrupted: {e}', file=sys.stderr)
        sys.exit(4)
    except KeyboardInterrupt:
        _close_bars()
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _close_bars():
    """Close open progress bars, so that the message printed next is the last line."""
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Command line: a preset row fills the defaults, explicit flags override them.

OPTIONAL = {'out', 'data_dir', 'batch_gpu', 'teacher'}
RUN_CONTROL = {'out', 'resume', 'steps', 'data_dir', 'log_every', 'ckpt_every', 'sample_every', 'workers',
               'on_nonfinite', 'teacher', 'batch_gpu', 'tf32', 'sample_cfg', 'sample_heun_steps'}   # all else must match


def add_common_args(p):
    """Flags of all three scripts: data, network, optimizer, schedule, EMA, precision, run control."""
    a = p.add_argument
    a('--out', help='run folder (default runs/<method>-<preset>)')
    a('--resume', action='store_true', help='continue the run in --out from its checkpoint.pt')
    a('--data', help='fashion-mnist, mnist, cifar10, an image folder, a .zip of images or a .npy of latents')
    a('--data-dir', help='folder of the named datasets (default $SCM_DATA, else ~/.cache/scm)')
    a('--model', help='network: a name in model.UNET_PRESETS or model.DIT_PRESETS')
    a('--batch', type=int, help='global batch size')
    a('--batch-gpu', type=int, help='per-process micro-batch; the rest of the batch is gradient accumulation')
    a('--steps', type=int, help='training iterations')
    a('--lr', type=float, help='reference learning rate alpha_ref')
    a('--lr-decay-steps', type=int, help="EDM2's t_ref: lr = alpha_ref / sqrt(max(step / t_ref, 1)); 0 = constant")
    a('--lr-rampup-mimg', type=float, help='linear lr rampup over this many million images')
    a('--optimizer', choices=['adam', 'radam'], help='Adam or RAdam')
    a('--betas', type=float, nargs=2, help='Adam betas')
    a('--eps', type=float, help='Adam epsilon')
    a('--ema-std', type=float, help="EDM2's power-function EMA with this sigma_rel (0: use --ema-halflife-mimg)")
    a('--ema-halflife-mimg', type=float, help="EDM's EMA half-life in million images")
    a('--dropout', type=float, help='dropout probability (U-Net: at resolutions <= the preset\'s dropout_res)')
    a('--P-mean', type=float, dest='P_mean', help='mean of log(sigma_d tan t) in the log-normal time proposal')
    a('--P-std', type=float, dest='P_std', help='std of log(sigma_d tan t) in the log-normal time proposal')
    a('--precision', choices=['fp32', 'bf16', 'fp16'], help='autocast dtype of the network body')
    a('--tf32', action='store_true', help='allow TF32 matmuls on Ampere+ GPUs (off, as in EDM and EDM2)')
    a('--seed', type=int, default=0, help='seed of the initial weights and of every step\'s random draws')
    a('--log-every', type=int, default=50, help='append a record to <out>/log.jsonl every K steps')
    a('--ckpt-every', type=int, default=500, help='write <out>/checkpoint.pt every K steps (and at the end)')
    a('--sample-every', type=int, default=1000, help='write sample grids <out>/samples/*.png every K steps (0 = never)')
    a('--workers', type=int, default=0, help='DataLoader worker processes for image files decoded lazily')
    a('--on-nonfinite', choices=['stop', 'skip'], default='stop',
      help='NaN/Inf in the loss, a loss term or the gradient: stop naming it (exit 3), or skip the step')


def add_cm_args(p):
    """Flags of the consistency-model scripts (sCT and sCD)."""
    a = p.add_argument
    a('--teacher', help="the TrigFlow teacher's checkpoint (train_teacher.py); the student starts from its EMA")
    a('--tangent-c', type=float, dest='tangent_c', help='c of the tangent normalization g / (||g|| + c)')
    a('--tangent-norm', choices=['rms', 'l2'], help='the norm ||g|| of the tangent normalization (trigflow.py)')
    a('--warmup-steps', type=int, help='tangent warmup H: r = min(1, step / H)')
    a('--discrete', type=int, help='0: continuous time (sCM); N: the discrete-time baseline on an N-step grid')


def cm_preset(model, data, lr, steps, dropout, P, t_ref, **kw):
    """CM settings shared by sCT and sCD on ImageNet (sCM Tables 4-5): the teacher's optimizer (Adam (0.9, 0.99,
    1e-11), batch 2048, fp16) with lr = teacher lr x 0.01 and the same decay t_ref, no rampup (UNCONFIRMED), c = 0.1,
    10k warmup, EMA sigma_rel 0.05."""
    return dict(dict(model=model, data=data, batch=2048, steps=steps, lr=lr, lr_decay_steps=t_ref, lr_rampup_mimg=0.0,
                     optimizer='adam', betas=(0.9, 0.99), eps=1e-11, ema_std=0.05, ema_halflife_mimg=0.0,
                     dropout=dropout, P_mean=P[0], P_std=P[1], precision='fp16', tangent_c=0.1, tangent_norm='rms',
                     warmup_steps=10_000, discrete=0), **kw)


def parse_args(p, presets):
    """Parse with the chosen preset's row as the defaults; `--preset X --help` shows that row's values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--preset', '--size', dest='preset', choices=sorted(presets))
    chosen = pre.parse_known_args()[0].preset
    keys = set().union(*presets.values())
    for action in p._actions:
        if action.dest in keys:
            action.help = (action.help or '') + (f' [{chosen}: %(default)s]' if chosen else ' [set by --preset]')
        elif action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            action.help = (action.help or '') + ' [default: %(default)s]'
    if chosen:
        p.set_defaults(**presets[chosen])
    args = p.parse_args()
    for k, v in vars(args).items():
        if isinstance(v, list):
            setattr(args, k, tuple(v))
    missing = [k for k, v in vars(args).items() if v is None and k not in OPTIONAL]
    if missing:
        raise UserError(f'preset {args.preset!r} sets no value for {missing}; pass them as flags')
    for k in ('batch', 'steps', 'log_every', 'ckpt_every'):
        if getattr(args, k) <= 0:
            raise UserError(f'--{k.replace("_", "-")} must be positive, not {getattr(args, k)}')
    if args.batch_gpu is not None and args.batch_gpu <= 0:
        raise UserError(f'--batch-gpu must be positive, not {args.batch_gpu}')
    for k in ('lr', 'workers', 'sample_every', 'dropout', 'P_std', 'eps'):
        v = getattr(args, k)
        if v < 0 or v == 0 and k in ('lr', 'P_std'):
            raise UserError(f'--{k.replace("_", "-")} must be {"positive" if k in ("lr", "P_std") else "at least 0"}, '
                            f'not {v}')
    return args


def run_config(args):
    """What a resume must match: every flag except run control."""
    return {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}


_LOCKS = []                                                         # open lock files, held until exit


def open_run(args, method, rank=0):
    """The run folder and its checkpoint path. Refuses to overwrite a run, to resume a missing one, and (rank 0) to
    share the folder with another live process: an flock on <out>/.lock, released by the OS when its holder dies.
    Holding it, rank 0 removes what dead writers left: temporary files, and a log without a checkpoint."""
    args.out = args.out or os.path.join('runs', f'{method}-{args.preset}')
    path = os.path.join(args.out, 'checkpoint.pt')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f'--out {args.out} is a file, not a folder')
    if os.path.exists(path) and not args.resume:
        raise UserError(f'{args.out} already holds a run; pass --resume to continue it or --out for a new one')
    if args.resume and not os.path.exists(path):
        raise UserError(f'--resume: no checkpoint at {path}')
    if rank != 0:
        return path
    try:
        os.makedirs(args.out, exist_ok=True)
        lock = open(os.path.join(args.out, '.lock'), 'a+')
    except OSError as e:
        raise UserError(f'cannot write to --out {args.out}: {e.strerror}') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise UserError(f'{args.out} is in use by another process ({lock.read().strip() or "pid unknown"}); '
                        f'wait for it to end, or stop it, or pass another --out') from None
    lock.truncate(0)
    lock.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    lock.flush()
    _LOCKS.append(lock)
    stale = glob.glob(glob.escape(path) + '.tmp*') + glob.glob(os.path.join(glob.escape(args.out), 'samples', '*.tmp'))
    if not args.resume:
        stale += [os.path.join(args.out, 'log.jsonl')]                  # a run killed before its first checkpoint
    for f in stale:
        if os.path.exists(f):
            os.remove(f)
    return path


def micro_batches(args, world, n):
    """(batch per micro-batch, micro-batches per step) on each of `world` processes, for a dataset of n items."""
    if args.batch % world:
        raise UserError(f'--batch {args.batch} is not divisible by the {world} processes')
    batch_gpu = args.batch_gpu or args.batch // world
    if (args.batch // world) % batch_gpu:
        raise UserError(f'--batch-gpu {batch_gpu} must divide the per-process batch {args.batch // world}')
    batch_indices(n, batch_gpu, 0, world, args.seed, 0)                  # too small a dataset: fail now
    return batch_gpu, args.batch // world // batch_gpu


def load_data(args, rank, world):
    """The training set; under DDP rank 0 downloads what is missing while the others wait."""
    if world > 1 and rank != 0:
        dist.barrier()
    dataset = data.load_dataset(args.data, args.data_dir, 'train', download=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    return dataset


def model_kwargs_for(args, dataset, dropout_everywhere=False):
    """Architecture of the run: a U-Net or DiT preset, checked against the data's shape and labels.
    dropout_everywhere: dropout in every U-Net block, as EDM2's (the teachers are EDM2 config G, sCM App. G.1);
    else the preset's dropout_res (consistency models: resolutions <= 16 on ImageNet, App. G.2)."""
    C, H, W = dataset.shape
    if args.model in model.UNET_PRESETS:
        kw = dict(model.UNET_PRESETS[args.model], arch='unet')
        want = (kw['img_channels'], kw['img_resolution'], kw['img_resolution'])
    elif args.model in model.DIT_PRESETS:
        kw = dict(model.DIT_PRESETS[args.model], arch='dit', input_size=H, in_channels=C, patch_size=2,
                  label_dim=dataset.num_classes)
        want = (C, H, W)
    else:
        raise UserError(f'--model {args.model!r} is not in model.UNET_PRESETS or model.DIT_PRESETS')
    if tuple(dataset.shape) != want:
        raise UserError(f'{dataset.name} has items of shape {"x".join(map(str, dataset.shape))} (CxHxW) but model '
                        f'{args.model!r} expects {"x".join(map(str, want))}; pick a matching --model/--preset')
    label_dim = kw['label_dim']
    if label_dim and not dataset.num_classes:
        raise UserError(f'model {args.model!r} is class-conditional ({label_dim} classes) but {dataset.name} has no labels')
    if label_dim and dataset.num_classes != label_dim:
        raise UserError(f'{dataset.name} has {dataset.num_classes} classes but model {args.model!r} expects {label_dim}')
    kw['dropout'] = args.dropout
    if dropout_everywhere and kw['arch'] == 'unet':
        kw['dropout_res'] = kw['img_resolution']
    return kw


# ---------------------------------------------------------------------------------------------------------------
# Seeds and the data stream: a function of (seed, step, rank), so resuming repeats it exactly.


def step_seed(seed, step, micro, rank):
    """A distinct 63-bit seed for every (run seed, step, micro-batch, rank)."""
    h = hashlib.sha256(f'{seed}/{step}/{micro}/{rank}'.encode()).digest()
    return int.from_bytes(h[:8], 'little') & ((1 << 63) - 1)


def batch_indices(n, batch_gpu, rank, world, seed, micro):
    """Indices of global micro-batch number `micro` for this rank: epochs are seeded permutations of the data."""
    per_epoch = n // (batch_gpu * world)
    if per_epoch == 0:
        raise UserError(f'the dataset has {n} items, fewer than one global micro-batch ({batch_gpu} x {world})')
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
        return self.dataset.get_batch(batch_indices(len(self.dataset), *self.args, m).tolist())


def data_stream(dataset, batch_gpu, rank, world, seed, start_micro, workers):
    """Yield micro-batches (x0, labels) from number start_micro on."""
    if workers == 0:
        m = start_micro
        while True:
            yield dataset.get_batch(batch_indices(len(dataset), batch_gpu, rank, world, seed, m).tolist())
            m += 1
    loader = torch.utils.data.DataLoader(_Batches(dataset, batch_gpu, rank, world, seed), batch_size=None,
                                         sampler=range(start_micro, 1 << 62), num_workers=workers,
                                         persistent_workers=True)
    yield from loader


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, one-line errors, resume only into the same configuration.


def save_checkpoint(path, obj):
    """Atomic: write a temporary file in the same folder, then rename it over the old checkpoint. A failed write
    removes its temporary file and says how much space the disk has left."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, Exception):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        full = getattr(e, 'errno', None) == errno.ENOSPC or free < 64 * 2 ** 20
        raise UserError(f'cannot write {path}: ' + ('the disk is full' if full else f'{type(e).__name__}: {e}') +
                        f' ({free / 2 ** 20:.0f} MB free); the previous checkpoint is intact') from None


CKPT_KEYS = ('method', 'step', 'config', 'model_kwargs', 'net', 'ema')


def load_checkpoint(path):
    """A checkpoint of train_teacher.py, train_sct.py or train_scd.py; anything else gets one line."""
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path}' + (' (a folder)' if os.path.isdir(path) else ''))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')                    # e.g. torch.load's warning on a TorchScript archive
            ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}') from None
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f'{path} is not a checkpoint of this project\'s training scripts (a {type(ckpt).__name__}'
                        + (f' without {", ".join(missing)})' if isinstance(ckpt, dict) else ')'))
    return ckpt


def resume(path, method, config, net, ema, wnet, opt, scaler, log_path=None):
    """Load a run's state in place; returns (step, log window). Refuses a checkpoint of another method or
    configuration. Drops the log records a killed run wrote after that step, and a torn last line."""
    ckpt = load_checkpoint(path)
    theirs = ckpt['config']
    diff = sorted(k for k in set(config) | set(theirs) if config.get(k) != theirs.get(k))
    if ckpt['method'] != method or diff:
        what = [f'method={ckpt["method"]!r} there vs {method!r} here'] if ckpt['method'] != method else []
        what += [f'--{k.replace("_", "-")}={theirs.get(k)!r} there vs {config.get(k)!r} here' for k in diff]
        raise UserError(f'{path} was written by another configuration: ' + ', '.join(what))
    for module, key in ((net, 'net'), (ema, 'ema'), (wnet, 'wnet'), (opt, 'opt'), (scaler, 'scaler')):
        module.load_state_dict(ckpt[key])
    if log_path and os.path.exists(log_path):
        keep = []
        with open(log_path) as f:
            for line in f:
                try:
                    if json.loads(line)['step'] <= ckpt['step']:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    pass                                                 # torn by a kill mid-write
        with open(log_path, 'w') as f:
            f.writelines(keep)
    return ckpt['step'], new_window(**ckpt.get('log_window', {}))


def load_teacher(path, kwargs):
    """The EMA weights of a trained TrigFlow teacher (sCM App. G: students start from them; sCD also distills them)."""
    if not path:
        raise UserError('this method starts from a TrigFlow teacher: pass --teacher runs/teacher-<preset>/checkpoint.pt')
    ckpt = load_checkpoint(path)
    if ckpt.get('method') != 'teacher':
        raise UserError(f'{path} is a {ckpt.get("method")!r} checkpoint, not a TrigFlow teacher (train_teacher.py)')
    mine, theirs = model.architecture(kwargs), model.architecture(ckpt['model_kwargs'])
    if mine != theirs:
        raise UserError(f'teacher {path} has another architecture: ' + ', '.join(
            f'{k}={theirs.get(k)!r} there vs {mine.get(k)!r} here'
            for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)))
    teacher = model.build(dict(ckpt['model_kwargs'], dropout=0.0))
    teacher.load_state_dict(ckpt['ema'])
    return teacher.eval().requires_grad_(False)


def start_from(net, teacher):
    """Load the teacher's weights into a student; only a student's CFG-scale input may be missing from them."""
    missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any('cfg' not in k for k in missing):
        raise UserError(f'cannot start from the teacher: missing {missing}, unexpected {unexpected}')


def checkpoint(step, method, args, model_kwargs, dataset, net, ema, wnet, opt, scaler, window, device, world):
    """Everything a resume, sample.py and fid.py need; call it on every rank (the log window is averaged over them,
    so that the first log record after a resume is the one an uninterrupted run writes)."""
    if world > 1 and window['sums']:
        vec = torch.tensor([float(v) for v in window['sums'].values()], device=device, dtype=torch.float64)
        dist.all_reduce(vec)
        window['sums'] = dict(zip(window['sums'], (vec / world).tolist()))
    return dict(method=method, step=step, config=run_config(args), model_kwargs=model_kwargs,
                data=dict(name=dataset.name, shape=tuple(dataset.shape), is_latent=dataset.is_latent,
                          num_classes=dataset.num_classes),
                net=net.state_dict(), ema=ema.state_dict(), wnet=wnet.state_dict(), opt=opt.state_dict(),
                scaler=scaler.state_dict(), sampling=sampling_defaults(args),
                log_window=dict(sums={k: float(v) for k, v in window['sums'].items()}, n=window['n']))


def sampling_defaults(args):
    """What sample.py and fid.py use unless told otherwise: the teacher's Heun steps and guidance scale, a guided
    student's guidance for 1 and 2 steps (sCM Table 6 on ImageNet 512)."""
    cfg = getattr(args, 'sample_cfg', 1.0)
    return dict(heun_steps=getattr(args, 'sample_heun_steps', 18), cfg=tuple(cfg) if isinstance(cfg, (list, tuple))
                else cfg)


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


def grad_norm(opt):
    grads = [p.grad for g in opt.param_groups for p in g['params'] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


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


def check_step(terms, device, world):
    """(names of the terms that hold a NaN or Inf, whether to stop for a signal), the same on every rank: one
    all-reduce agrees on both, so that no rank waits for one that has stopped."""
    bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    flags = torch.tensor([float(bool(bad)), float(bool(_SIGNAL))], device=device)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bad or (['(on another rank)'] if flags[0].item() else []), bool(flags[1].item())


def interrupted(step, ckpt_path):
    return Interrupted(f'{", ".join(_SIGNAL) or "a signal on another rank"} after step {step}; the checkpoint '
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


def new_window(sums=None, n=0):
    """The log's current window: sums of the terms over its n steps, and the time of the steps this process ran."""
    return dict(sums=dict(sums or {}), n=n, timed=0, t0=time.time())


def window_add(window, terms):
    window['n'] += 1
    window['timed'] += 1
    for k, v in terms.items():
        window['sums'][k] = window['sums'].get(k, 0.0) + v


def log_record(path, step, lr, batch, window, device, world, reset=True):
    """Average the window over its steps and the ranks, append it to log.jsonl (path None: not rank 0), reset it.
    reset=False (the last step of a run that is not a log step): the window goes on, into the checkpoint, so that
    a resumed run's next record is the one an uninterrupted run writes."""
    stats = {k: float(v) / window['n'] for k, v in window['sums'].items()}
    if world > 1:
        vec = torch.tensor(list(stats.values()), device=device)
        dist.all_reduce(vec)
        stats = dict(zip(stats, (vec / world).tolist()))
    elapsed = time.time() - window['t0']
    rec = dict(step=step, lr=lr, images_per_s=window['timed'] * batch / elapsed,
               sec_per_step=elapsed / max(window['timed'], 1), mem_gb=peak_mem_gb(device), **stats)
    if path:
        with open(path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
    if reset:
        window.update(new_window())
    return rec


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


def save_grids(out, step, dataset, images):
    """{sampler name: images in [-1, 1]} -> <out>/samples/<step>-<name>.png (latents need sample.py's decoder)."""
    if dataset.is_latent:
        return
    for name, x in images.items():
        data.save_grid(x.float().clamp(-1, 1).cpu(), os.path.join(out, 'samples', f'{step:07d}-{name}.png'))


def report_weights(net, rank, world):
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
