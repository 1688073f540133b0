"""What the three training scripts (train_teacher.py, train_sct.py, train_scd.py) share: torchrun/DDP set-up, the
data stream, the networks and their checkpoints, EMA, the learning-rate schedule, the training loop with gradient
accumulation and mixed precision, the NaN guard, logging and sample grids. The method itself is in trigflow.py and
each script's `loss` function.

Exact resume: every random draw of a step (data order, t, z, dropout, label dropout) comes from generators seeded by
(seed, step, rank), so a run resumed from a checkpoint repeats bit for bit what an uninterrupted run does; no RNG
state needs saving. Checkpoints are written to a temporary file and renamed, so a killed run never leaves a torn one.
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model
import trigflow as tf


class UserError(Exception):
    """A problem with the command line or the inputs, reported in one line (exit code 2)."""


def main_guard(main):
    """Run main(); print user errors as one line and exit 2, a stopped non-finite run exits 3."""
    try:
        main()
        if dist.is_initialized():
            dist.barrier()          # every rank done with its collectives before any tears the group down
    except (UserError, data.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f'stopped: {e}', file=sys.stderr)
        sys.exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Command line: each script passes its preset table; a preset fills the defaults, explicit flags override them.


def parse_args(description, presets, add_method_args):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', '--size', dest='preset', choices=sorted(presets), required=True,
                   help='experiment preset (model, data and hyperparameters from the paper tables)')
    p.add_argument('--out', help='run folder (default runs/<script>-<preset>)')
    p.add_argument('--resume', action='store_true', help='continue from <out>/checkpoint.pt')
    p.add_argument('--data', help="dataset name (mnist, fashion-mnist, cifar10), image folder, .zip or latents .npy")
    p.add_argument('--data-dir', default=None, help='folder of named datasets (default $SCM_DATA or ~/.cache/scm)')
    p.add_argument('--model', help='network preset from model.UNET_PRESETS or model.DIT_PRESETS')
    p.add_argument('--batch', type=int, help='global batch size')
    p.add_argument('--batch-gpu', type=int, default=None, help='per-device batch; the rest is gradient accumulation')
    p.add_argument('--steps', type=int, help='training iterations')
    p.add_argument('--lr', type=float, help='reference learning rate alpha_ref')
    p.add_argument('--lr-decay-steps', type=int, help="EDM2's t_ref: lr = alpha_ref / sqrt(max(step / t_ref, 1)); 0 = constant")
    p.add_argument('--lr-rampup-mimg', type=float, help='linear lr rampup over this many million images (EDM2: 10)')
    p.add_argument('--optimizer', choices=['adam', 'radam'])
    p.add_argument('--betas', type=float, nargs=2)
    p.add_argument('--eps', type=float, help='Adam epsilon')
    p.add_argument('--ema-std', type=float, help="EDM2 power-function EMA with this sigma_rel (0 = use --ema-halflife-mimg)")
    p.add_argument('--ema-halflife-mimg', type=float, help='traditional EMA half-life in million images (EDM: 0.5)')
    p.add_argument('--dropout', type=float)
    p.add_argument('--P-mean', type=float, dest='P_mean', help='log-normal proposal mean of log(sigma_d tan t)')
    p.add_argument('--P-std', type=float, dest='P_std')
    p.add_argument('--precision', choices=['fp32', 'bf16', 'fp16'], help='autocast dtype of the network body')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--log-every', type=int, default=50)
    p.add_argument('--ckpt-every', type=int, default=500)
    p.add_argument('--sample-every', type=int, default=1000, help='write a sample grid PNG every K steps (0 = never)')
    p.add_argument('--workers', type=int, default=0, help='DataLoader workers for lazily decoded data')
    p.add_argument('--on-nonfinite', choices=['stop', 'skip'], default='stop',
                   help='NaN/Inf in the loss, a loss term or the gradient: stop naming it, or skip the step')
    add_method_args(p)
    first, _ = p.parse_known_args()
    if first.preset is None:
        p.error('--preset is required')
    p.set_defaults(**presets[first.preset])
    args = p.parse_args()
    for k, v in vars(args).items():
        if isinstance(v, list):
            setattr(args, k, tuple(v))
    missing = [k for k, v in vars(args).items() if v is None and k not in OPTIONAL]
    if missing:
        raise UserError(f'preset {args.preset!r} sets no value for {missing}; pass them as flags')
    return args


def add_cm_args(p):
    """Flags of the consistency-model scripts (sCT and sCD)."""
    p.add_argument('--teacher', help="the TrigFlow teacher's checkpoint (train_teacher.py); the student starts from its EMA")
    p.add_argument('--tangent-c', type=float, dest='tangent_c', help='tangent normalization constant c (0.1)')
    p.add_argument('--tangent-norm', choices=['rms', 'l2'], help='norm of the tangent normalization (trigflow.py)')
    p.add_argument('--warmup-steps', type=int, help='tangent warmup H (10k)')
    p.add_argument('--discrete', type=int, help='0: continuous time (sCM); N: discrete-time dsCD on an N-step grid')
    p.add_argument('--sample-cfg', type=float, default=1.0, help='guidance scale of the sample grids')


def cm_preset(model, data, lr, steps, dropout, P, t_ref, **kw):
    """CM settings shared by sCT and sCD on ImageNet (sCM Tables 4-5): the teacher's optimizer (Adam (0.9, 0.99,
    1e-11), batch 2048, fp16) with lr = teacher lr x 0.01 and the same decay t_ref, no rampup (UNCONFIRMED), c = 0.1,
    10k warmup, EMA sigma_rel 0.05."""
    return dict(dict(model=model, data=data, batch=2048, steps=steps, lr=lr, lr_decay_steps=t_ref, lr_rampup_mimg=0.0,
                     optimizer='adam', betas=(0.9, 0.99), eps=1e-11, ema_std=0.05, ema_halflife_mimg=0.0,
                     dropout=dropout, P_mean=P[0], P_std=P[1], precision='fp16', tangent_c=0.1, tangent_norm='rms',
                     warmup_steps=10_000, discrete=0), **kw)


OPTIONAL = {'out', 'data_dir', 'batch_gpu', 'teacher'}
RUN_CONTROL = {'out', 'resume', 'steps', 'data_dir', 'log_every', 'ckpt_every', 'sample_every', 'workers',
               'on_nonfinite', 'teacher', 'batch_gpu'}   # may change on --resume; everything else must match


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain `python` runs one process).


def init_distributed():
    if 'RANK' not in os.environ:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        return 0, 1, device
    use_cuda = torch.cuda.is_available()
    dist.init_process_group('nccl' if use_cuda else 'gloo')
    local = int(os.environ.get('LOCAL_RANK', 0))
    if use_cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f'cuda:{local}' if use_cuda else 'cpu')


def step_seed(seed, step, micro, rank):
    """A distinct 63-bit seed for every (run seed, step, micro-batch, rank)."""
    h = hashlib.sha256(f'{seed}/{step}/{micro}/{rank}'.encode()).digest()
    return int.from_bytes(h[:8], 'little') & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------------------
# Networks and checkpoints.


def model_kwargs_for(args, dataset):
    """Architecture of the run: a U-Net or DiT preset, checked against the data's shape and labels."""
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
    return kw


def build_net(kwargs):
    kw = dict(kwargs)
    arch = kw.pop('arch')
    return model.UNet(**kw) if arch == 'unet' else model.DiT(**kw)


def architecture(kwargs):
    """The parts of model kwargs that decide the weights' shapes (not dropout, not the CFG input)."""
    return {k: v for k, v in kwargs.items() if k not in ('dropout', 'dropout_res', 'cfg_embed')}


def save_checkpoint(path, obj):
    """Atomic: write a temporary file in the same folder, then rename over the old checkpoint."""
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f'no checkpoint at {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}') from None


def load_teacher(path, kwargs):
    """The EMA weights of a trained TrigFlow teacher (sCM App. G: students start from them; sCD also distills them)."""
    if not path:
        raise UserError('this method starts from a TrigFlow teacher: pass --teacher runs/teacher-<preset>/checkpoint.pt')
    ckpt = load_checkpoint(path)
    if ckpt.get('method') != 'teacher':
        raise UserError(f'{path} is a {ckpt.get("method")!r} checkpoint, not a TrigFlow teacher (train_teacher.py)')
    if architecture(ckpt['model_kwargs']) != architecture(kwargs):
        diff = sorted(k for k in set(architecture(kwargs)) | set(architecture(ckpt['model_kwargs']))
                      if architecture(kwargs).get(k) != architecture(ckpt['model_kwargs']).get(k))
        raise UserError(f'teacher {path} has another architecture: ' + ', '.join(
            f'{k}={ckpt["model_kwargs"].get(k)!r} there vs {kwargs.get(k)!r} here' for k in diff))
    teacher = build_net(dict(ckpt['model_kwargs'], dropout=0.0))
    teacher.load_state_dict(ckpt['ema'])
    return teacher.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# EMA and learning rate.


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


def learning_rate(args, step):
    """EDM2's schedule (EDM2 Eq. 67 with rampup): alpha_ref / sqrt(max(k / t_ref, 1)), linear rampup over the first
    lr_rampup_mimg million images."""
    lr = args.lr
    if args.lr_decay_steps > 0:
        lr /= math.sqrt(max((step + 1) / args.lr_decay_steps, 1))
    if args.lr_rampup_mimg > 0:
        lr *= min((step + 1) * args.batch / (args.lr_rampup_mimg * 1e6), 1)
    return lr


# ---------------------------------------------------------------------------------------------------------------
# The data stream: a function of (seed, step, rank), so resuming repeats it exactly.


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
        return self.dataset.get_batch(batch_indices(len(self.dataset), *self.args[:3], self.args[3], m).tolist())


def data_stream(dataset, batch_gpu, rank, world, seed, start_micro, workers):
    """Yield micro-batches from number start_micro on."""
    if workers == 0:
        m = start_micro
        while True:
            yield dataset.get_batch(batch_indices(len(dataset), batch_gpu, rank, world, seed, m).tolist())
            m += 1
    sampler = range(start_micro, 1 << 62)
    loader = torch.utils.data.DataLoader(_Batches(dataset, batch_gpu, rank, world, seed), batch_size=None,
                                         sampler=sampler, num_workers=workers, persistent_workers=True)
    yield from loader


# ---------------------------------------------------------------------------------------------------------------
# The run: everything a script needs, built once.


class NonFiniteError(Exception):
    pass


class Run:
    """Sets up the process group, data, networks, EMA, adaptive weight, optimizer and output folder, and resumes
    when asked. The script then calls `train(loss, sample)`."""

    def __init__(self, args, method, script, cfg_embed=False):
        self.args, self.method = args, method
        self.rank, self.world, self.device = init_distributed()
        self.is_main = self.rank == 0
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        args.out = args.out or os.path.join('runs', f'{script}-{args.preset}')
        self.ckpt_path = os.path.join(args.out, 'checkpoint.pt')
        if os.path.exists(self.ckpt_path) and not args.resume:
            raise UserError(f'{args.out} already holds a run; pass --resume to continue it or --out for a new one')
        if args.resume and not os.path.exists(self.ckpt_path):
            raise UserError(f'--resume: no checkpoint at {self.ckpt_path}')

        if self.world > 1 and not self.is_main:
            dist.barrier()                                   # wait while rank 0 downloads what is missing
        self.dataset = data.load_dataset(args.data, args.data_dir, 'train', download=self.is_main)
        if self.world > 1 and self.is_main:
            dist.barrier()
        self.model_kwargs = model_kwargs_for(args, self.dataset)
        if cfg_embed:
            self.model_kwargs['cfg_embed'] = True
        if args.batch % self.world:
            raise UserError(f'--batch {args.batch} is not divisible by the {self.world} processes')
        self.batch_gpu = args.batch_gpu or args.batch // self.world
        if (args.batch // self.world) % self.batch_gpu:
            raise UserError(f'--batch-gpu {self.batch_gpu} must divide the per-process batch {args.batch // self.world}')
        self.accum = args.batch // self.world // self.batch_gpu
        batch_indices(len(self.dataset), self.batch_gpu, self.rank, self.world, args.seed, 0)   # too small: fail now

        self.amp_dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.precision]
        torch.manual_seed(args.seed)                        # the same initial weights on every rank and every run
        self.net = build_net(self.model_kwargs).to(self.device)
        self.wnet = tf.AdaptiveWeight().to(self.device)
        self.step, self.saved_step = 0, None

    def finish_setup(self, init_state=None):
        """Build EMA, optimizer and DDP wrappers; init_state: weights to start from (a student's teacher EMA)."""
        args = self.args
        if init_state is not None:
            missing, unexpected = self.net.load_state_dict(init_state, strict=False)
            if unexpected or any('cfg' not in k for k in missing):
                raise UserError(f'cannot start from the teacher: missing {missing}, unexpected {unexpected}')
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        params = list(self.net.parameters()) + list(self.wnet.parameters())
        Opt = torch.optim.RAdam if args.optimizer == 'radam' else torch.optim.Adam
        self.opt = Opt(params, lr=args.lr, betas=tuple(args.betas), eps=args.eps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.precision == 'fp16')
        if args.resume:
            self._resume()
        if self.world > 1:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            self.ddp_net = DDP(self.net, device_ids=ids)
            self.ddp_wnet = DDP(self.wnet, device_ids=ids)
        else:
            self.ddp_net, self.ddp_wnet = self.net, self.wnet
        if self.is_main:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, 'config.json'), 'w') as f:
                json.dump(dict(vars(args), model_kwargs=self.model_kwargs, world=self.world), f, indent=1)

    def config(self):
        return {k: v for k, v in vars(self.args).items() if k not in RUN_CONTROL}

    def _resume(self):
        ckpt = load_checkpoint(self.ckpt_path)
        mine, theirs = self.config(), ckpt['config']
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if ckpt.get('method') != self.method or diff:
            what = [f'method={ckpt.get("method")!r} there vs {self.method!r} here'] if ckpt.get('method') != self.method else []
            what += [f'--{k.replace("_", "-")}={theirs.get(k)!r} there vs {mine.get(k)!r} here' for k in diff]
            raise UserError(f'{self.ckpt_path} was written by another configuration: ' + ', '.join(what))
        self.net.load_state_dict(ckpt['net'])
        self.ema.load_state_dict(ckpt['ema'])
        self.wnet.load_state_dict(ckpt['wnet'])
        self.opt.load_state_dict(ckpt['opt'])
        self.scaler.load_state_dict(ckpt['scaler'])
        self.step = self.saved_step = ckpt['step']
        if self.is_main:                                     # drop log lines the killed run wrote after this point
            log = os.path.join(self.args.out, 'log.jsonl')
            if os.path.exists(log):
                with open(log) as f:
                    keep = [line for line in f if json.loads(line)['step'] <= self.step]
                with open(log, 'w') as f:
                    f.writelines(keep)

    def save(self):
        self.saved_step = self.step
        if self.is_main:
            save_checkpoint(self.ckpt_path, dict(
                method=self.method, step=self.step, config=self.config(), model_kwargs=self.model_kwargs,
                data=dict(name=self.dataset.name, shape=tuple(self.dataset.shape), is_latent=self.dataset.is_latent,
                          num_classes=self.dataset.num_classes),
                net=self.net.state_dict(), ema=self.ema.state_dict(), wnet=self.wnet.state_dict(),
                opt=self.opt.state_dict(), scaler=self.scaler.state_dict()))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def weights_digest(self):
        """sha256 of the raw network weights, the same on every rank if DDP kept them in step."""
        h = hashlib.sha256()
        for v in self.net.state_dict().values():
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -----------------------------------------------------------------------------------------------------------

    def train(self, loss_fn, sample_fn):
        """The loop. loss_fn(x0, labels, step) -> (loss, terms) for one micro-batch (it reads self.ddp_net etc.);
        sample_fn(net, z, labels) -> {name: images in data space} for the grid PNGs."""
        args = self.args
        bar = tqdm(total=args.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                   desc=f'{self.method} {args.preset}')
        try:
            self._loop(bar, loss_fn, sample_fn)
        finally:
            bar.close()                                  # before any error message, so that it is the last line
        digest = self.weights_digest()
        if self.world > 1:
            digests = [None] * self.world
            dist.all_gather_object(digests, digest)
            if self.is_main:
                print(f'weights sha256 per rank: {[d[:16] for d in digests]}; identical: {len(set(digests)) == 1}')
        elif self.is_main:
            print(f'weights sha256: {digest[:16]}')

    def _loop(self, bar, loss_fn, sample_fn):
        args = self.args
        log_path = os.path.join(args.out, 'log.jsonl')
        stream = data_stream(self.dataset, self.batch_gpu, self.rank, self.world, args.seed,
                             self.step * self.accum, args.workers)
        grid_gen = torch.Generator().manual_seed(12345)
        C, H, W = self.dataset.shape
        n_grid = 64 if H <= 64 else 16
        grid_z = torch.randn(n_grid, C, H, W, generator=grid_gen) * tf.SIGMA_D
        grid_labels = (torch.arange(n_grid) % self.dataset.num_classes) if self.model_kwargs['label_dim'] else None
        t_last, seen, n_win, sums = time.time(), 0, 0, {}
        self.net.train()
        while self.step < args.steps:
            lr = learning_rate(args, self.step)
            for group in self.opt.param_groups:
                group['lr'] = lr
            self.opt.zero_grad(set_to_none=True)
            terms_step = {}
            for micro in range(self.accum):
                torch.manual_seed(step_seed(args.seed, self.step, micro, self.rank))
                x0, labels = next(stream)
                x0, labels = x0.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                last = micro == self.accum - 1
                with contextlib.ExitStack() as stack:
                    stack.enter_context(self.autocast())
                    if self.world > 1 and not last:
                        stack.enter_context(self.ddp_net.no_sync())
                        stack.enter_context(self.ddp_wnet.no_sync())
                    loss, terms = loss_fn(x0, labels, self.step)
                    self.scaler.scale(loss / self.accum).backward()
                for k, v in terms.items():
                    terms_step[k] = terms_step.get(k, 0.0) + v.detach().float() / self.accum
            self.scaler.unscale_(self.opt)
            grads = [p.grad for p in self.opt.param_groups[0]['params'] if p.grad is not None]
            terms_step['grad_norm'] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if args.precision == 'fp16' and not torch.isfinite(terms_step['grad_norm']):
                del terms_step['grad_norm']                      # fp16: the GradScaler skips the step and backs off
            if self._nonfinite(terms_step):
                self.opt.zero_grad(set_to_none=True)
                self.scaler.update()
                self.step += 1
                bar.update(1)
                continue
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.model_kwargs['arch'] == 'unet':
                model.project_weights_(self.net)                # EDM2's forced weight normalization
            self.step += 1
            beta = ema_beta(args, self.step, args.batch)
            with torch.no_grad():
                for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                    p_ema.lerp_(p.detach(), 1 - beta)
            seen, n_win = seen + args.batch, n_win + 1
            for k, v in terms_step.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            if self.step % args.log_every == 0 or self.step == args.steps:
                stats = {k: float(v) / n_win for k, v in sums.items()}
                if self.world > 1:
                    vec = torch.tensor(list(stats.values()), device=self.device)
                    dist.all_reduce(vec)
                    stats = dict(zip(stats, (vec / self.world).tolist()))
                elapsed = time.time() - t_last
                rec = dict(step=self.step, lr=lr, images_per_s=seen / elapsed, sec_per_step=elapsed / n_win,
                           mem_gb=self._peak_mem_gb(), **stats)
                if self.is_main:
                    with open(log_path, 'a') as f:
                        f.write(json.dumps(rec) + '\n')
                    bar.set_postfix(loss=f'{stats["loss"]:.4f}', ips=f'{rec["images_per_s"]:.0f}')
                t_last, seen, n_win, sums = time.time(), 0, 0, {}
            if self.step % args.ckpt_every == 0 or self.step == args.steps:
                self.save()
            if self.is_main and args.sample_every and (self.step % args.sample_every == 0 or self.step == args.steps):
                self.write_grids(sample_fn, grid_z, grid_labels)

    def _nonfinite(self, terms):
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        flag = torch.tensor([float(bool(bad))], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return False
        names = ', '.join(f'{k}={float(terms[k]):.4g}' for k in bad) or 'on another rank'
        if self.args.on_nonfinite == 'stop':
            last = (f'the last checkpoint, {self.ckpt_path}, is from step {self.saved_step}'
                    if self.saved_step is not None else 'no checkpoint was written yet')
            raise NonFiniteError(f'step {self.step}: non-finite {names}; {last}. Lower --lr, use --precision fp32, '
                                 f'or pass --on-nonfinite skip')
        if self.is_main:
            tqdm.write(f'step {self.step}: non-finite {names}; step skipped')
        return True

    def _peak_mem_gb(self):
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB

    @torch.no_grad()
    def write_grids(self, sample_fn, z, labels):
        self.ema.eval()
        dev = self.device
        images = sample_fn(self.ema, z.to(dev), None if labels is None else labels.to(dev))
        for name, x in images.items():
            if self.dataset.is_latent:
                continue                                     # latents need a VAE decoder: sample.py
            data.save_grid(x.float().clamp(-1, 1).cpu(),
                           os.path.join(self.args.out, 'samples', f'{self.step:07d}-{name}.png'))
