"""The command line of the three training scripts: the flags they share, and parsing with a preset's row as the
defaults (explicit flags override it). The presets themselves are in each script, beside its loop.
"""
import argparse

import baselines
from cli import UserError


OPTIONAL = {'out', 'data_dir', 'batch_gpu', 'student', 'init', 'guide_net'}   # every other flag needs a value
HINTS = {'data': '--data (the ImageNet presets: the .npy of `python latents.py encode`, or the .zip of '
                 '`python make_dataset.py` for ImageNet 64)',
         'teacher': '--teacher (a checkpoint.pt of train_teacher.py)'}
RUN_CONTROL = {'out', 'resume', 'steps', 'data_dir', 'log_every', 'ckpt_every', 'sample_every', 'workers',
               'on_nonfinite', 'teacher', 'batch_gpu', 'tf32', 'sample_cfg', 'sample_heun_steps',
               'two_pass'}   # all else must match


def add_common_args(p):
    """Flags of all three scripts: data, network, optimizer, schedule, EMA, precision, run control."""
    a = p.add_argument
    a('--out', help='run folder (default runs/<method>-<preset>)')
    a('--resume', action='store_true', help='continue the run in --out from its checkpoint.pt')
    a('--data', help='fashion-mnist, mnist, cifar10, an image folder, a .zip of images or a .npy of latents')
    a('--data-dir', help='folder of the named datasets (default $SCM_DATA, else ~/.cache/scm)')
    a('--model', help='network: a name in model.UNET_PRESETS, DDPMPP_PRESETS or DIT_PRESETS')
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
    a('--two-pass', action='store_true', help='the tangent from a separate no-grad JVP pass, then a forward with '
      'gradient (trigflow.scm_loss): the same loss and gradients, ~2x a diffusion step instead of ~1.7x')


def parse_args(p, presets, recipes=None):
    """Parse with the chosen preset's row, then the chosen recipe's, as the defaults; `--preset X [--recipe R]
    --help` shows the values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--preset', '--size', dest='preset', choices=sorted(presets))
    pre.add_argument('--recipe', choices=list(recipes or {'scm': {}}), default='scm')
    known = pre.parse_known_args()[0]
    chosen, recipe = known.preset, (recipes or {}).get(known.recipe, {})
    keys = set().union(*presets.values())
    for action in p._actions:
        if action.dest in recipe and action.dest != 'recipe':
            action.help = (action.help or '') + f' [{known.recipe}: %(default)s]'
        elif action.dest in keys:
            action.help = (action.help or '') + (f' [{chosen}: %(default)s]' if chosen else ' [set by --preset]')
        elif action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            action.help = (action.help or '') + ' [default: %(default)s]'
    if chosen:
        p.set_defaults(**presets[chosen])
    p.set_defaults(**recipe)
    args = p.parse_args()
    for k, v in vars(args).items():
        if isinstance(v, list):
            setattr(args, k, tuple(v))
    missing = [k for k, v in vars(args).items()
               if v is None and k not in OPTIONAL and k not in baselines.RECIPE_KEYS]
    if missing:
        raise UserError(f'preset {args.preset!r} needs ' + ', '.join(HINTS.get(k, '--' + k.replace('_', '-'))
                                                                    for k in missing))
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
    if recipes:
        baselines.check_recipe(args)
    return args


def run_config(args):
    """What a resume must match: every flag except run control."""
    return {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
