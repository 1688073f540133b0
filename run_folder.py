"""The run folder of a training script: one writer at a time (an flock), no litter, exact resume into the same
configuration, the checkpoint's full state, and log.jsonl with the log window that a resume carries on.
"""
import atexit
import fcntl
import glob
import json
import os
import socket
import time

import torch
import torch.distributed as dist

import checkpoint as ck
from cli import UserError
from train_args import run_config
from train_util import peak_mem_gb

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
    created = not os.path.exists(args.out)
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
    atexit.register(_tidy, args.out, created)
    stale = glob.glob(glob.escape(path) + '.tmp*') + glob.glob(os.path.join(glob.escape(args.out), 'samples', '*.tmp'))
    if not args.resume:
        stale += [os.path.join(args.out, 'log.jsonl')]                  # a run killed before its first checkpoint
    for f in stale:
        if os.path.exists(f):
            os.remove(f)
    return path


def _tidy(out, created):
    """At exit: a run that stopped before its first step (bad data, say) leaves no litter: its lock and config go,
    and the folder too if this process made it."""
    if any(os.path.exists(os.path.join(out, name)) for name in ('checkpoint.pt', 'log.jsonl')):
        return
    for name in ('.lock', 'config.json'):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if created and not os.listdir(out):
        os.rmdir(out)


def resume(path, method, config, net, ema, wnet, opt, scaler, log_path=None, extra=None):
    """Load a run's state in place; returns (step, log window). Refuses a checkpoint of another method or
    configuration. Drops the log records a killed run wrote after that step, and a torn last line."""
    ckpt = ck.load(path)
    if 'opt' not in ckpt:
        raise UserError(f'{path} holds EMA weights only (checkpoint.py export), not a run to resume; start a new run '
                        f'(a student from it: --teacher)')
    theirs = ckpt['config']
    diff = sorted(k for k in set(config) | set(theirs) if config.get(k) != theirs.get(k))
    if ckpt['method'] != method or diff:
        what = [f'method={ckpt["method"]!r} there vs {method!r} here'] if ckpt['method'] != method else []
        what += [f'--{k.replace("_", "-")}={theirs.get(k)!r} there vs {config.get(k)!r} here' for k in diff]
        raise UserError(f'{path} was written by another configuration: ' + ', '.join(what))
    for module, key in ((net, 'net'), (ema, 'ema'), (wnet, 'wnet'), (opt, 'opt'), (scaler, 'scaler'),
                        *((m, k) for k, m in (extra or {}).items())):      # extra: sCD + aVSD's F_phi, ...
        try:
            module.load_state_dict(ckpt[key])
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f'{path}: its {key!r} does not fit this run ({type(e).__name__}: {str(e)[:100]}); an '
                            f'sCD + aVSD run written before F_phi joined the one optimizer cannot resume: start '
                            f'it again from its --student') from None
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


def run_state_all_ranks(step, method, args, model_kwargs, dataset, net, ema, wnet, opt, scaler, window, device, world,
                        extra=None):
    """Everything a resume, sample.py and fid.py need; call it on every rank (the log window is averaged over them,
    so that the first log record after a resume is the one an uninterrupted run writes)."""
    if world > 1 and window['sums']:
        vec = torch.tensor([float(v) for v in window['sums'].values()], device=device, dtype=torch.float64)
        dist.all_reduce(vec)
        window['sums'] = dict(zip(window['sums'], (vec / world).tolist()))
    return dict(method=method, step=step, config=run_config(args), model_kwargs=model_kwargs,
                data=dict(name=dataset.name, shape=tuple(dataset.shape), is_latent=dataset.is_latent,
                          num_classes=dataset.num_classes, latents=getattr(dataset, 'latent_stats', None)),
                net=net.state_dict(), ema=ema.state_dict(), wnet=wnet.state_dict(), opt=opt.state_dict(),
                scaler=scaler.state_dict(), sampling=sampling_defaults(args),
                log_window=dict(sums={k: float(v) for k, v in window['sums'].items()}, n=window['n']),
                **{k: m.state_dict() for k, m in (extra or {}).items()})


def sampling_defaults(args):
    """What sample.py and fid.py use unless told otherwise: the teacher's Heun steps and guidance scale, a guided
    student's guidance for 1 and 2 steps (sCM Table 6 on ImageNet 512)."""
    cfg = getattr(args, 'sample_cfg', 1.0)
    return dict(heun_steps=getattr(args, 'sample_heun_steps', 18), cfg=tuple(cfg) if isinstance(cfg, (list, tuple))
                else cfg)


def new_window(sums=None, n=0):
    """The log's current window: sums of the terms over its n steps, and the time of the steps this process ran."""
    return dict(sums=dict(sums or {}), n=n, timed=0, t0=time.time())


def window_add(window, terms):
    window['n'] += 1
    window['timed'] += 1
    for k, v in terms.items():
        window['sums'][k] = window['sums'].get(k, 0.0) + v


def log_record_all_ranks(path, step, lr, batch, window, device, world, reset=True):
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
