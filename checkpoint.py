"""The run folder: one writer at a time, atomic checkpoints that only this project's scripts write and read, exact
resume into the same configuration, and log.jsonl with the log window that a resume carries on. Exported
checkpoints (the EMA weights and what sampling needs, as shipped in checkpoints/):

  python checkpoint.py export runs/scd-fashion-s/checkpoint.pt checkpoints/scd-fashion-s.pt
"""
import argparse
import atexit
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import time

import torch
import torch.distributed as dist

import cli
import edm_pickle
import model
import safe_pickle
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


def save(path, obj):
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


CKPT_KEYS = ('method', 'step', 'config', 'model_kwargs', 'ema')     # and 'net', 'opt', ... unless exported
SHIPPED_KEYS = ('method', 'step', 'config', 'model_kwargs', 'data', 'sampling', 'ema')


METHODS = ('teacher', 'scd', 'sct')                                # what the training scripts write
MAX_PARAMS = int(float(os.environ.get('SCM_MAX_PARAMS', 4e9)))      # > EDM2-XXL's 1.5B; a file names a bigger net


def load(path):
    """A checkpoint of train_teacher.py, train_sct.py or train_scd.py; anything else gets one line. Its zip records'
    CRCs are checked, then it is read with weights_only=True (tensors, numbers, strings and containers only, so a
    file that carries code is refused before any of it runs: a checkpoint travels between people), every tensor
    dense (safe_pickle.torch_load), and its keys, method, model_kwargs and EMA weights of the form the scripts write."""
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path}' + (' (a folder)' if os.path.isdir(path) else ''))
    try:
        ckpt = safe_pickle.torch_load(path)
    except safe_pickle.ReadError as e:
        raise UserError(f'cannot read checkpoint {e}' if str(e).startswith(str(path)) else str(e)) from None
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f'{path} is not a checkpoint of this project\'s training scripts (a {type(ckpt).__name__}'
                        + (f' without {", ".join(missing)})' if isinstance(ckpt, dict) else ')'))
    if ckpt['method'] not in METHODS:
        raise UserError(f'{path}: method {str(ckpt["method"])[:40]!r}; this project\'s scripts write '
                        f'{", ".join(METHODS)}')
    for key in ('ema', 'net'):
        if key in ckpt:
            check_weights(ckpt[key], f'{path}: its {key!r}')
    check_model_kwargs(ckpt['model_kwargs'], path)
    return ckpt


def check_weights(state, what):
    """A state_dict as the scripts write one: names to floating-point tensors."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) and
                                              v.is_floating_point() for k, v in state.items()):
        raise UserError(f'{what} is not a table of floating-point tensors by name')


def check_model_kwargs(kw, path):
    """model_kwargs of a known architecture whose numbers are of a network's size: small ints, short lists (so that
    even building it on the meta device is quick)."""
    def small(v):
        if isinstance(v, (list, tuple)):
            return len(v) <= 16 and all(small(x) for x in v)
        return v is None or isinstance(v, (str, float)) or isinstance(v, int) and -1 <= v <= 65536
    if not isinstance(kw, dict) or kw.get('arch') not in ('unet', 'ddpmpp', 'dit') or \
            not all(isinstance(k, str) and small(v) for k, v in kw.items()) or \
            not 0 <= kw.get('num_blocks', 0) <= 64 or not 0 <= kw.get('depth', 0) <= 256:
        raise UserError(f'{path}: its model_kwargs ({str(kw)[:100]}) are not those of a network of this project')


def build(kw, state, path):
    """model.build(kw) holding `state`, refused before anything is allocated when it would not fit (build_meta)."""
    build_meta(kw, state, path)
    net = model.build(kw)
    net.load_state_dict(state)
    return net


def build_meta(kw, state, path):
    """Check that model.build(kw) would hold `state`, allocating nothing: built on the meta device, its parameter
    count bounded by MAX_PARAMS (env SCM_MAX_PARAMS raises it), every name and shape compared with `state`."""
    check_model_kwargs(kw, path)
    try:
        with torch.device('meta'):
            meta = model.build(kw)
    except (TypeError, ValueError, KeyError, AssertionError, IndexError, ZeroDivisionError, RuntimeError) as e:
        raise UserError(f'{path}: its model_kwargs build no network here ({type(e).__name__}: {str(e)[:120]})') \
            from None
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise UserError(f'{path}: its model_kwargs make a network of {n / 1e9:.1f}B parameters, over the limit of '
                        f'{MAX_PARAMS / 1e9:.1f}B (set SCM_MAX_PARAMS to raise it)')
    mine = meta.state_dict()
    bad = [f'{k} {list(v.shape)} there vs {list(mine[k].shape) if k in mine else "none"} here'
           for k, v in state.items() if k not in mine or mine[k].shape != v.shape]
    bad += [f'{k} missing' for k in mine if k not in state]
    if bad:
        raise UserError(f'{path}: its weights do not fit its model_kwargs\' network: {", ".join(bad[:3])}')


def resume(path, method, config, net, ema, wnet, opt, scaler, log_path=None, extra=None):
    """Load a run's state in place; returns (step, log window). Refuses a checkpoint of another method or
    configuration. Drops the log records a killed run wrote after that step, and a torn last line."""
    ckpt = load(path)
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


def read_teacher(path, method='teacher'):
    """Read and check a teacher's file before any work (the scripts call it before opening the run folder): the EMA
    weights of a TrigFlow teacher (sCM App. G: students start from them; sCD also distills them), or with method='scd'
    of an sCD student (sCD + aVSD continues one; ('scd', 'teacher'): either). A .pkl is EDM's or EDM2's network, read
    as data (edm_pickle.py). Returns {method, model_kwargs, ema, path}, its weights checked to fit its network."""
    if not path:
        raise UserError('this method starts from a TrigFlow teacher: pass --teacher runs/teacher-<preset>/checkpoint.pt')
    if method == 'teacher' and str(path).endswith('.pkl'):             # EDM's own pickle, read as data only
        kw, state = edm_pickle.convert_file(path)
        ckpt = dict(method='teacher', model_kwargs=kw, ema=state)
    else:
        ckpt = load(path)
    if ckpt.get('method') not in ((method,) if isinstance(method, str) else method):
        raise UserError(f'{path} is a {ckpt.get("method")!r} checkpoint, not ' + (
            'a TrigFlow teacher (train_teacher.py)' if method == 'teacher' else
            f'a {" or ".join((method,) if isinstance(method, str) else method)} checkpoint'))
    check_weights(ckpt['ema'], f'{path}: its weights')
    build_meta(dict(ckpt['model_kwargs'], dropout=0.0), ckpt['ema'], path)
    return dict(method=ckpt['method'], model_kwargs=ckpt['model_kwargs'], ema=ckpt['ema'], path=path)


def load_teacher(teacher, kwargs, same_architecture=True):
    """The network of read_teacher's `teacher`, in eval mode without gradients, refused if its architecture is not
    the run's (kwargs). same_architecture=False: a teacher the student does not start from (EDM2's, whose time path
    students replace) or a guide network needs only the data's shape."""
    path = teacher['path']
    mine, theirs = model.architecture(kwargs), model.architecture(teacher['model_kwargs'])
    if not same_architecture:                                          # only the data's shape must agree
        keys = ('img_resolution', 'img_channels', 'input_size', 'in_channels')
        mine, theirs = ({k: a.get(k) for k in keys} for a in (mine, theirs))
    if mine != theirs:
        raise UserError(f'teacher {path} has another architecture: ' + ', '.join(
            f'{k}={theirs.get(k)!r} there vs {mine.get(k)!r} here'
            for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)))
    return build(dict(teacher['model_kwargs'], dropout=0.0), teacher['ema'], path).eval().requires_grad_(False)


def read_edm2_init(path):
    """train_teacher.py --init: an EDM2 pickle's U-Net (model_kwargs, state), read and checked before any work."""
    kw, state = edm_pickle.convert_file(path)
    if not kw.get('edm2'):
        raise UserError(f'{path}: --init takes an EDM2 U-Net pickle (an EDM DDPM++ teaches as it is: --teacher)')
    build_meta(kw, state, path)
    return kw, state


def init_from_edm2(net, init, path):
    """Start a U-Net with the paper's time path from an EDM2 pickle's U-Net (train_teacher.py --init; `init` from
    read_edm2_init): every weight but EDM2's Fourier time embedding, the output gain negated (EDM2's F is -F of
    TrigFlow, App. B.2). The time path and the modulation (ADN, §4.1) then re-fit by a short TrigFlow diffusion
    fine-tune, SANA-Sprint's route."""
    kw, state = init
    state = {k: v for k, v in state.items() if not k.startswith('emb_fourier.')}
    state['out_gain'] = -state['out_gain']
    mine = net.state_dict()
    bad = [f'{k} {tuple(v.shape)} there vs {tuple(mine[k].shape) if k in mine else "none"} here'
           for k, v in state.items() if k not in mine or mine[k].shape != v.shape]
    if bad or set(mine) - set(state) - {'emb_time.freqs'}:
        raise UserError(f'{path}: another U-Net than --model\'s: ' + ', '.join(
            bad[:3] or sorted(set(mine) - set(state) - {'emb_time.freqs'})[:3]))
    net.load_state_dict(state, strict=False)


def start_from(net, teacher):
    """Load the teacher's weights into a student; only a student's CFG-scale input may be missing from them."""
    missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any('cfg' not in k for k in missing):
        raise UserError(f'cannot start from the teacher: missing {missing}, unexpected {unexpected}')


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


def export(src, dst):
    """The part of a checkpoint that sampling, FID, edits and --teacher read (EMA weights, architecture, config,
    sampling defaults), without the raw weights and optimizer state: what travels, at a third of the size."""
    ckpt = load(src)
    save(dst, {k: ckpt[k] for k in SHIPPED_KEYS if k in ckpt})
    return os.path.getsize(dst)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description='python checkpoint.py export runs/scd-fashion-s/checkpoint.pt '
                                            'checkpoints/scd-fashion-s.pt: keep what sampling needs (EMA weights)')
    p.add_argument('command', choices=['export'])
    p.add_argument('src', help='checkpoint.pt of a training script')
    p.add_argument('dst', help='the .pt to write')
    a = p.parse_args()
    cli.main_guard(lambda: print(f'wrote {a.dst}: {export(a.src, a.dst) / 2 ** 20:.2f} MB, EMA weights of '
                                 f'step {load(a.dst)["step"]}'))
