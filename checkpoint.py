"""Checkpoints as files: read and checked (safe_pickle: CRCs, weights only, dense tensors; keys, method, model_kwargs,
shapes against the network before anything is allocated), networks built from them, teachers read before any work,
atomic writes, the per-step seed that sampling and training share, and exported checkpoints (the EMA weights and what
sampling needs, as shipped in checkpoints/). Imports no training helper: sample.py, fid.py and edit.py use it too.

  python checkpoint.py export runs/scd-fashion-s/checkpoint.pt checkpoints/scd-fashion-s.pt
"""
import argparse
import errno
import hashlib
import os
import shutil
import sys

import torch

import cli
import edm_pickle
import model
import safe_pickle
from cli import UserError

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
    kw = ckpt['model_kwargs']
    if kw.get('arch') == 'unet' and 'attention_axis' not in kw and path not in _NOTED:
        _NOTED.add(path)           # model._with_defaults keeps its layout: it samples and teaches as it was trained
        print(f'note: {path} predates the U-Net attention fix (its attention runs across channels, kept as trained)',
              file=sys.stderr)
    return ckpt


_NOTED = set()                                                      # checkpoints whose old layout was noted


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


def step_seed(seed, step, micro, rank):
    """A distinct 63-bit seed for every (run seed, step, micro-batch, rank); sampling: (seed, 0, 0, image index)."""
    h = hashlib.sha256(f'{seed}/{step}/{micro}/{rank}'.encode()).digest()
    return int.from_bytes(h[:8], 'little') & ((1 << 63) - 1)


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
