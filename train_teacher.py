"""Train the TrigFlow diffusion teacher that sCT and sCD start from (sCM §3, Eq. 4; App. G.1).

  python train_teacher.py --preset fashion-s                                   # Fashion-MNIST on a CPU
  torchrun --nproc_per_node=8 train_teacher.py --size xl --data in512-latents.npy  # ImageNet 512 latents, Table 5

The network predicts F with x0 = cos(t) x_t - sin(t) sigma_d F; the loss is the TrigFlow flow-matching loss with
EDM2's learned adaptive weighting, a log-normal proposal over sigma = sigma_d tan t, and (ImageNet 512) label
dropout 0.1 so that the teacher supports classifier-free guidance. `--preset X --help` lists every flag with X's value.
"""
import argparse
import copy
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint as ck
import cli
import model
import run_folder as rf
import train_args
import train_util as tu
import trigflow as tf


# EDM2 config G as sCM uses it (Tables 4-5): Adam (0.9, 0.99, 1e-11), lr alpha_ref / sqrt(max(k / t_ref, 1)) after a
# 10 Mimg rampup, batch 2048, fp16 network body. Sampling: Heun with 32 steps (63 NFE).
IMAGENET = dict(data=None, batch=2048, lr_rampup_mimg=10.0, optimizer='adam', betas=(0.9, 0.99), eps=1e-11,
                ema_halflife_mimg=0.0, precision='fp16', sample_heun_steps=32)
IN512 = dict(IMAGENET, P_mean=-0.4, P_std=1.0, lr_decay_steps=70_000, label_dropout=0.1)
IN64 = dict(IMAGENET, P_mean=-0.8, P_std=1.6, lr_decay_steps=35_000, label_dropout=0.0, sample_cfg=1.0)
# CPU presets for Fashion-MNIST (not paper configurations): EDM2-style lr, short rampup and decay.
FASHION = dict(data='fashion-mnist', batch=128, lr=1e-2, optimizer='adam', betas=(0.9, 0.99), eps=1e-8, ema_std=0.05,
               ema_halflife_mimg=0.0, dropout=0.0, P_mean=-0.8, P_std=1.6, precision='fp32', label_dropout=0.1,
               sample_heun_steps=18, sample_cfg=1.0)
PRESETS = {
    # ImageNet 512x512, SD-VAE latents: sCM Table 5, diffusion rows (lr, iterations, dropout, teacher EMA sigma_rel);
    # guidance for FID from Table 6
    's':   dict(IN512, model='s',   lr=1.0e-2, steps=1_048_000, dropout=0.0, ema_std=0.025, sample_cfg=1.4),
    'm':   dict(IN512, model='m',   lr=9.0e-3, steps=1_048_000, dropout=0.1, ema_std=0.030, sample_cfg=1.2),
    'l':   dict(IN512, model='l',   lr=8.0e-3, steps=696_000,   dropout=0.1, ema_std=0.015, sample_cfg=1.2),
    'xl':  dict(IN512, model='xl',  lr=7.0e-3, steps=598_000,   dropout=0.1, ema_std=0.020, sample_cfg=1.2),
    'xxl': dict(IN512, model='xxl', lr=6.5e-3, steps=376_000,   dropout=0.1, ema_std=0.015, sample_cfg=1.2),
    # ImageNet 64x64 pixels: sCM Table 4, diffusion rows; unguided (no label dropout, no guidance)
    'img64-s':  dict(IN64, model='img64-s',  lr=1.0e-2, steps=1_048_000, dropout=0.0, ema_std=0.075),
    'img64-m':  dict(IN64, model='img64-m',  lr=9.0e-3, steps=1_486_000, dropout=0.1, ema_std=0.060),
    'img64-l':  dict(IN64, model='img64-l',  lr=8.0e-3, steps=761_000,   dropout=0.1, ema_std=0.040),
    'img64-xl': dict(IN64, model='img64-xl', lr=7.0e-3, steps=540_000,   dropout=0.1, ema_std=0.040),
    # CIFAR-10: sCM App. G (batch 512, 400k iterations, Adam lr 1e-3, (0.9, 0.999), 1e-8, dropout 0.13) with EDM's
    # CIFAR defaults it follows (EMA half-life 0.5 Mimg, 10 Mimg lr rampup, fp32). P = EDM's (-1.2, 1.2): UNCONFIRMED.
    'cifar10': dict(model='cifar10', data='cifar10', batch=512, steps=400_000, lr=1e-3, lr_decay_steps=0,
                    lr_rampup_mimg=10.0, optimizer='adam', betas=(0.9, 0.999), eps=1e-8, ema_std=0.0,
                    ema_halflife_mimg=0.5, dropout=0.13, P_mean=-1.2, P_std=1.2, precision='fp32', label_dropout=0.0,
                    sample_heun_steps=18, sample_cfg=1.0),
    'fashion':   dict(FASHION, model='fashion',   steps=20_000, lr_decay_steps=4_000, lr_rampup_mimg=0.05),
    'fashion-s': dict(FASHION, model='fashion-s', steps=3_000,  lr_decay_steps=1_000, lr_rampup_mimg=0.025),
}


def teacher_loss(net, x0, labels, *, wnet=None, P_mean, P_std, label_dropout=0.0):
    """The TrigFlow diffusion loss of one batch (Eq. 4) with the adaptive weight w_phi(t) (Eq. 8's form) and label
    dropout (the null class -1) for classifier-free guidance."""
    if label_dropout:
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < label_dropout, -1, labels)
    t = tf.sample_t(x0.shape[0], P_mean, P_std, device=x0.device)                  # log-normal proposal
    z = torch.randn_like(x0) * tf.SIGMA_D                                           # z ~ N(0, sigma_d^2 I)
    loss, mse = tf.diffusion_loss(lambda u, t: net(u, t, labels), x0, t, z, w=None if wnet is None else wnet(t))
    return loss, dict(loss=loss.detach(), mse=mse.mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', '--size', dest='preset', choices=sorted(PRESETS), required=True,
                   help='experiment preset: model, data and hyperparameters from the paper\'s tables')
    train_args.add_common_args(p)
    p.add_argument('--label-dropout', type=float, help='probability of training with the null label (for CFG)')
    p.add_argument('--sample-heun-steps', type=int, help='Heun steps of the grids and of sample.py (2N - 1 NFE)')
    p.add_argument('--sample-cfg', type=float, help='guidance scale of the grids and of sample.py (1 = none)')
    p.add_argument('--init', help="start from an EDM2 pickle's U-Net with the paper's time path, to re-fit it "
                   '(then the student of an EDM2 teacher: train_scd.py --student)')
    args = train_args.parse_args(p, PRESETS)
    init = args.init and ck.read_edm2_init(args.init)     # read and checked before any work
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
    ckpt_path = rf.open_run(args, 'teacher', rank)
    log_path = os.path.join(args.out, 'log.jsonl') if rank == 0 else None

    # Data: micro-batches of batch_gpu per process, accum of them per step.
    dataset = tu.load_data_all_ranks(args, rank, world)
    batch_gpu, accum = tu.micro_batches(args, world, len(dataset))
    model_kwargs = tu.model_kwargs_for(args, dataset, dropout_everywhere=True)   # EDM2 config G (App. G.1)

    # Networks: the same initial weights on every rank; EMA and the adaptive weight w_phi(t) (Eq. 8).
    torch.manual_seed(args.seed)
    net = model.build(model_kwargs).to(device)
    if args.init:                                         # EDM2's weights, the paper's time path (re-fit here)
        ck.init_from_edm2(net, init, args.init)
    wnet = tf.AdaptiveWeight().to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = tu.optimizer(args, list(net.parameters()) + list(wnet.parameters()))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')
    step, saved_step, window = 0, None, rf.new_window()
    if args.resume:
        step, window = rf.resume(ckpt_path, 'teacher', train_args.run_config(args), net, ema, wnet, opt, scaler, log_path)
        saved_step = step
    ddp_net, ddp_wnet = (DDP(net), DDP(wnet)) if dist.is_initialized() else (net, wnet)   # any torchrun run
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'config.json'), 'w') as f:
            json.dump(dict(vars(args), model_kwargs=model_kwargs, world=world), f, indent=1)
        print(f'run folder: {args.out} ({"resumed at step " + str(step) if step else "new"}); {world} process(es), '
              f'{batch_gpu} x {accum} micro-batches each per step, on {device}')

    # The loss of one micro-batch, built once (as in train_scd.py and train_sct.py): the TrigFlow diffusion loss.
    def loss_fn(x0, labels, step):
        return teacher_loss(ddp_net, x0, labels, wnet=ddp_wnet, P_mean=args.P_mean, P_std=args.P_std,
                            label_dropout=args.label_dropout)

    # The loop. Every random draw of a step is seeded by (seed, step, micro-batch, rank), so a resume repeats it.
    # Calls named *_all_ranks (and dist.*, DDP's backward) are collectives: every rank makes them, in the same order.
    stream = tu.data_stream(dataset, batch_gpu, rank, world, args.seed, step * accum, args.workers)
    grid_z, grid_labels = tu.grid_inputs(dataset, model_kwargs['label_dim'], device)
    draw_grids = rank == 0 and args.sample_every and tu.grids_decodable(dataset, device)   # latents: needs the VAE
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=f'teacher {args.preset}')
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
            if model_kwargs['arch'] == 'unet':
                model.project_weights_(net)
            tu.update_ema(ema, net, tu.ema_beta(args, step, args.batch))
            rf.window_add(window, terms)

        # Log, sample grid, checkpoint (the grid first: a kill between them redoes both on resume).
        if (step % args.log_every == 0 or step == args.steps) and window['n']:
            rec = rf.log_record_all_ranks(log_path, step, lr, args.batch, window, device, world,
                                          reset=step % args.log_every == 0)
            bar.set_postfix(loss=f'{rec["loss"]:.4f}', ips=f'{rec["images_per_s"]:.0f}')
        if draw_grids and (step % args.sample_every == 0 or step == args.steps):
            F = lambda u, t: ema(u, t, grid_labels)                      # the paper's teacher sampler: EDM Heun
            if args.sample_cfg != 1 and grid_labels is not None:
                F = tf.guided(F, lambda u, t: ema(u, t, torch.full_like(grid_labels, -1)), args.sample_cfg)
            nfe = 2 * args.sample_heun_steps - 1
            tu.save_grids(args.out, step, dataset, {f'heun{nfe}': tf.sample_heun(F, grid_z, args.sample_heun_steps)})
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            state = rf.run_state_all_ranks(step, 'teacher', args, model_kwargs, dataset, net, ema, wnet, opt, scaler,
                                           window, device, world)
            if rank == 0:
                ck.save(ckpt_path, state)
            saved_step = step
        if stop:
            raise tu.interrupted(step, ckpt_path)
    bar.close()
    tu.report_weights_all_ranks(net, rank, world)


if __name__ == '__main__':
    cli.main_guard(main)
