"""sCT: continuous-time consistency training from data (sCM Alg. 1, App. G), started from a TrigFlow teacher's EMA.

  python train_sct.py --preset fashion-s --teacher runs/teacher-fashion-s/checkpoint.pt
  torchrun --nproc_per_node=8 train_sct.py --size xl --data in512-latents.npy --teacher runs/teacher-xl/checkpoint.pt

No teacher is evaluated: dx_t/dt = cos(t) z - sin(t) x0 is the one-sample estimate of the PF-ODE velocity from the
same (x0, z) that made x_t. The paper starts sCT from the teacher's EMA on every dataset (App. G.2), so this script
needs the teacher checkpoint too. --discrete N trains the discrete-time variant on an N-step grid (App. E);
--recipe ict and --recipe ct2023 train the discrete-time consistency models sCM compares against, as published.
`--preset X --help` lists every flag with X's value.
"""
import argparse
import copy
import functools
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import baselines as bl
import checkpoint as ck
import cli
import model
import run_folder as rf
import train_args
import train_util as tu
import trigflow as tf

# What every CM row shares (sCM Tables 4-5): the teacher's optimizer, Adam (0.9, 0.99, 1e-11), batch 2048, fp16, with
# lr = the teacher's x 0.01 and the same decay t_ref, no rampup (UNCONFIRMED); c = 0.1, 10k warmup, EMA sigma_rel 0.05.
CM = dict(batch=2048, lr_rampup_mimg=0.0, optimizer='adam', betas=(0.9, 0.99), eps=1e-11, ema_std=0.05,
          ema_halflife_mimg=0.0, precision='fp16', tangent_c=0.1, tangent_norm='rms', warmup_steps=10_000, discrete=0)
IN512 = dict(CM, data=None, steps=100_000, P_mean=-0.8, P_std=1.6, lr_decay_steps=70_000)
IN64 = dict(CM, data=None, steps=400_000, dropout=0.45, P_mean=-1.0, P_std=1.6, lr_decay_steps=35_000)
FASHION = dict(CM, data='fashion-mnist', batch=128, lr=1e-3, lr_decay_steps=0, dropout=0.1, P_mean=-1.0, P_std=1.6,
               eps=1e-8, precision='fp32', warmup_steps=200)
PRESETS = {
    # ImageNet 512 latents: sCM Table 5, sCT rows (100k iterations, dropout 25%/35% at resolutions <= 16)
    's':   dict(IN512, model='s',   lr=1.0e-4, dropout=0.25),
    'm':   dict(IN512, model='m',   lr=9.0e-5, dropout=0.35),
    'l':   dict(IN512, model='l',   lr=8.0e-5, dropout=0.35),
    'xl':  dict(IN512, model='xl',  lr=7.0e-5, dropout=0.35),
    'xxl': dict(IN512, model='xxl', lr=6.5e-5, dropout=0.35),
    # ImageNet 64 pixels: sCM Table 4, sCT rows (400k iterations, dropout 45% at resolutions <= 16)
    'img64-s':  dict(IN64, model='img64-s',  lr=1.0e-4),
    'img64-m':  dict(IN64, model='img64-m',  lr=9.0e-5),
    'img64-l':  dict(IN64, model='img64-l',  lr=8.0e-5),
    'img64-xl': dict(IN64, model='img64-xl', lr=7.0e-5),
    # CIFAR-10: sCM App. G, as sCD but dropout 0.20 in all layers; iterations UNCONFIRMED (400k)
    'cifar10': dict(CM, model='cifar10', data='cifar10', batch=512, steps=400_000, lr=1e-4, lr_decay_steps=0,
                    optimizer='radam', eps=1e-8, ema_std=0.0, ema_halflife_mimg=0.5, precision='fp32', dropout=0.20,
                    P_mean=-1.0, P_std=1.4),
    # CPU presets for Fashion-MNIST (not paper configurations)
    'fashion':   dict(FASHION, model='fashion', steps=2_000),
    'fashion-s': dict(FASHION, model='fashion-s', steps=600),
}
def sct_loss(net, x0, labels, *, wnet=None, P_mean, P_std, r, c=0.1, tangent_norm='rms', grid=None,
             two_pass=False):
    """sCT's loss for one batch (Alg. 1): draw t and z, noise x0 to x_t; dx_t/dt = cos(t) z - sin(t) x0 comes from
    the same (x0, z), then trigflow.scm_loss. net(u, t, labels) is the network with gradient, trigflow.JVP-wrapped
    (and DDP-wrapped: its one pass gives F_theta, the tangent, and backward's all-reduce); wnet(t) the adaptive
    weight; r the tangent warmup factor; grid: a discrete time grid (App. E) instead of continuous t."""
    B = x0.shape[0]
    if grid is None:
        t, dt = tf.sample_t(B, P_mean, P_std, device=x0.device), None                 # log-normal proposal
    else:
        t, t_prev = bl.sample_interval(B, grid, P_mean, P_std, device=x0.device)     # discrete: a grid interval
        dt = t - t_prev
    z = torch.randn_like(x0) * tf.SIGMA_D                                            # z ~ N(0, sigma_d^2 I)
    x_t, dxdt = tf.forward_process(x0, t, z)                                         # dx_t/dt = cos t z - sin t x0
    loss = tf.scm_loss if dt is None else functools.partial(bl.dscd_loss, dt=dt)     # App. E: dsCD
    return loss(lambda u, t: net(u, t, labels), x_t, t, dxdt, w=None if wnet is None else wnet(t), r=r, c=c,
                tangent_norm=tangent_norm, two_pass=two_pass,
                jvp=lambda u, t, tangents: net(u, t, labels, tangents=tangents))


def build_loss(args, net, ddp_net, ddp_wnet, target, grid):
    """loss_fn(x0, labels, step) -> (loss, terms) of one micro-batch, for the method the flags name, built once
    before the loop (as EDM2's training loop builds its loss): sCT (Alg. 1), its discrete-time form on `grid`
    (App. E), or CT 2023 / iCT (--recipe, on the grid of its schedule at that step)."""
    if args.recipe == 'scm':
        return lambda x0, labels, step: sct_loss(
            ddp_net, x0, labels, wnet=ddp_wnet, P_mean=args.P_mean, P_std=args.P_std,
            r=tf.tangent_warmup(step, args.warmup_steps), c=args.tangent_c, tangent_norm=args.tangent_norm, grid=grid,
            two_pass=args.two_pass)

    def recipe_loss(x0, labels, step):
        N = bl.grid_at(args, step)[0]
        loss, terms = bl.ct_loss(ddp_net, target or net, x0, labels, bl.discrete_times(N - 1), intervals=args.intervals,
                              P_mean=args.P_mean, P_std=args.P_std, metric=args.metric, c=args.huber_c,
                              weighting=args.weighting)
        return loss, dict(terms, N=torch.tensor(float(N)))
    return recipe_loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', '--size', dest='preset', choices=sorted(PRESETS), required=True,
                   help='experiment preset: model, data and hyperparameters from the paper\'s tables')
    train_args.add_common_args(p)
    train_args.add_cm_args(p)
    bl.add_recipe_args(p, bl.CT_RECIPES)
    args = train_args.parse_args(p, PRESETS, bl.CT_RECIPES)
    teacher_file = ck.read_teacher(args.teacher)          # read and checked before any work
    tu.stop_on_signals()          # SIGTERM/SIGINT: finish the step, write a checkpoint, exit 4

    # DDP: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python` runs one process.
    if 'RANK' in os.environ:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f'cuda:{os.environ.get("LOCAL_RANK", 0)}' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False      # as EDM and EDM2
    tu.note_cpu_precision(args, device, rank)
    ckpt_path = rf.open_run(args, 'sct', rank)
    log_path = os.path.join(args.out, 'log.jsonl') if rank == 0 else None

    # Data: micro-batches of batch_gpu per process, accum of them per step.
    dataset = tu.load_data_all_ranks(args, rank, world)
    batch_gpu, accum = tu.micro_batches(args, world, len(dataset))
    model_kwargs = tu.model_kwargs_for(args, dataset, teacher_file)
    grid = bl.discrete_times(args.discrete) if args.discrete else None            # an N-step grid (App. E)

    # Networks: sCT too starts from the teacher's EMA (App. G.2), which it then no longer needs.
    # The same initial weights on every rank; EMA and the adaptive weight w_phi(t) (Eq. 8).
    torch.manual_seed(args.seed)
    net = model.build(model_kwargs).to(device)
    wnet = tf.AdaptiveWeight().to(device)
    teacher = ck.load_teacher(teacher_file, model_kwargs).to(device)
    ck.start_from(net, teacher)
    del teacher
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # A recipe's target theta-: an EMA of theta (CM 2023), or theta itself when mu0 = 0 (iCT's stopgrad theta).
    target = copy.deepcopy(net).requires_grad_(False) if args.recipe != 'scm' and args.mu0 > 0 else None
    extra = {'target': target} if target is not None else {}
    opt = tu.optimizer(args, list(net.parameters()) + list(wnet.parameters()))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')
    step, saved_step, window = 0, None, rf.new_window()
    if args.resume:
        step, window = rf.resume(ckpt_path, 'sct', train_args.run_config(args), net, ema, wnet, opt, scaler, log_path,
                                 extra=extra)
        saved_step = step
    # Any torchrun run. DDP wraps tf.JVP(net), whose forward runs the JVP: DDP cannot run inside one (trigflow.JVP).
    ddp_net, ddp_wnet = (DDP(tf.JVP(net)), DDP(wnet)) if dist.is_initialized() else (tf.JVP(net), wnet)
    projected = [net] if model_kwargs['arch'] == 'unet' else []
    # The loss of one micro-batch, built once from the flags: the loop below never asks which method it runs.
    loss_fn = build_loss(args, net, ddp_net, ddp_wnet, target, grid)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'config.json'), 'w') as f:
            json.dump(dict(vars(args), model_kwargs=model_kwargs, world=world), f, indent=1)
        print(f'run folder: {args.out} ({"resumed at step " + str(step) if step else "new"}); {world} process(es), '
              f'{batch_gpu} x {accum} micro-batches each per step, on {device}')

    # The loop. Every random draw of a step is seeded by (seed, step, micro-batch, rank), so a resume repeats it.
    # Calls named *_all_ranks (and dist.*, DDP's backward) are collectives: every rank makes them, in the same order.
    stream = tu.data_stream(dataset, batch_gpu, rank, world, args.seed, step * accum, args.workers)
    grid_z, grid_labels = tu.grid_inputs(dataset, model_kwargs['label_dim'], device)
    draw_grids = rank == 0 and args.sample_every and tu.grids_decodable(dataset, device)   # latents: needs the VAE
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=f'sct {args.preset}')
    net.train()
    while step < args.steps:
        lr = tu.learning_rate(args, step)
        for group in opt.param_groups:
            group['lr'] = lr
        opt.zero_grad(set_to_none=True)

        # Micro-batches: gradients accumulate, DDP syncs them on the last one only.
        terms = {}
        for micro in range(accum):
            torch.manual_seed(tu.step_seed(args.seed, step, micro, rank))
            x0, labels = (v.to(device) for v in next(stream))
            with tu.no_sync([ddp_net, ddp_wnet], micro < accum - 1):      # all-reduce in the last backward only
                with tu.autocast(device, args.precision):                    # forward and loss; backward outside
                    loss, micro_terms = loss_fn(x0, labels, step)
                scaler.scale(loss / accum).backward()
            for k, v in micro_terms.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float() / accum

        # Non-finite check: stop naming the term, or skip the step (fp16: the GradScaler skips and backs off).
        # All ranks also agree here whether a stop signal came.
        scaler.unscale_(opt)
        terms.update(tu.grad_norms(opt, drop_nonfinite=args.precision == 'fp16'))
        bad, stop = tu.check_step_all_ranks(terms, device, world)
        if bad and args.on_nonfinite == 'stop':
            raise cli.NonFiniteError(tu.nonfinite_message(step + 1, terms, bad, x0, ckpt_path, saved_step))
        if bad and rank == 0:
            tqdm.write(f'step {step + 1}: non-finite {", ".join(bad)}; step skipped')

        # Optimizer step, EDM2's forced weight normalization (EDM2 Eq. 66), EMA.
        if not bad:
            scaler.step(opt)
        scaler.update()
        step += 1
        bar.update(1)
        if not bad:
            for m in projected:
                model.project_weights_(m)
            tu.update_ema(ema, net, tu.ema_beta(args, step, args.batch))
            if target is not None:                                           # theta- <- mu theta- + (1 - mu) theta
                tu.update_ema(target, net, bl.grid_at(args, step - 1)[1])
            rf.window_add(window, terms)

        # Log, sample grid, checkpoint (the grid first: a kill between them redoes both on resume).
        if (step % args.log_every == 0 or step == args.steps) and window['n']:
            rec = rf.log_record_all_ranks(log_path, step, lr, args.batch, window, device, world,
                                          reset=step % args.log_every == 0)
            bar.set_postfix(loss=f'{rec["loss"]:.4f}', ips=f'{rec["images_per_s"]:.0f}')
        if draw_grids and (step % args.sample_every == 0 or step == args.steps):
            F = lambda u, t: ema(u, t, grid_labels)                      # 1 step, and 2 steps through t = 1.1
            tu.save_grids(args.out, step, dataset, {'1step': tf.sample_consistency(F, grid_z),
                                                    '2step': tf.sample_consistency(F, grid_z, (tf.T_MAX, tf.T_MID))})
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            state = rf.run_state_all_ranks(step, 'sct', args, model_kwargs, dataset, net, ema, wnet, opt, scaler,
                                           window, device, world, extra=extra)
            if rank == 0:
                ck.save(ckpt_path, state)
            saved_step = step
        if stop:
            raise tu.interrupted(step, ckpt_path)
    bar.close()
    tu.report_weights_all_ranks(net, rank, world)


if __name__ == '__main__':
    cli.main_guard(main)
