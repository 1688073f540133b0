"""sCD: continuous-time consistency distillation from a TrigFlow teacher (sCM Alg. 1, App. G).

  python train_scd.py --preset fashion-s --teacher runs/teacher-fashion-s/checkpoint.pt
  torchrun --nproc_per_node=8 train_scd.py --size xl --data in512-latents.npy --teacher runs/teacher-xl/checkpoint.pt

The student starts from the teacher's EMA weights and learns f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t/sigma_d, t)
so that f is constant along the teacher's PF-ODE: dx_t/dt = sigma_d F_teacher(x_t/sigma_d, t), with classifier-free
guidance at a scale s ~ U[1, s_max] that the student also sees (ImageNet 512). --discrete N trains the discrete-time
dsCD baseline (App. E) with the same improvements instead; --recipe cd2023 trains Consistency Models' CD as published.
`--preset X --help` lists every flag with X's value.
"""
import argparse
import copy
import functools
import json
import math
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
# sCD alone; sCD + adaptive VSD (Table 5) sets vsd = lambda_VSD = 1.0 and uses these proposals: L_VSD's, F_phi's.
SCD = dict(CM, vsd=0.0, P_vsd=(0.4, 2.0), P_fake=(-0.8, 1.6))
IN512 = dict(SCD, data=None, steps=200_000, P_mean=-0.8, P_std=1.6, lr_decay_steps=70_000, s_max=2.0)
VSD512 = dict(IN512, steps=20_000, vsd=1.0, warmup_steps=0)
IN64 = dict(SCD, data=None, steps=400_000, dropout=0.0, P_mean=-1.0, P_std=1.6, lr_decay_steps=35_000, s_max=1.0,
            sample_cfg=(1.0, 1.0))
# CIFAR-10: sCM App. G: RAdam lr 1e-4 (0.9, 0.99), 1e-8, no schedule, batch 512, P (-1.0, 1.4), dropout 0, EMA
# half-life 0.5 Mimg, fp32 (UNCONFIRMED); the iteration count is not stated (UNCONFIRMED: 400k)
CIFAR = dict(SCD, data='cifar10', batch=512, steps=400_000, lr=1e-4, lr_decay_steps=0, optimizer='radam', eps=1e-8,
             ema_std=0.0, ema_halflife_mimg=0.5, precision='fp32', dropout=0.0, P_mean=-1.0, P_std=1.4, s_max=1.0,
             sample_cfg=(1.0, 1.0))
FASHION = dict(SCD, data='fashion-mnist', batch=128, lr=1e-3, lr_decay_steps=0, dropout=0.0, P_mean=-1.0, P_std=1.6,
               eps=1e-8, precision='fp32', warmup_steps=200, s_max=2.0, sample_cfg=(1.0, 1.0))
PRESETS = {
    # ImageNet 512 latents: sCM Table 5, sCD rows (200k iterations, max CFG scale 2.0, P (-0.8, 1.6)); guidance for
    # FID with 1 and 2 steps from Table 6
    's':   dict(IN512, model='s',   lr=1.0e-4, dropout=0.0, sample_cfg=(1.5, 1.4)),
    'm':   dict(IN512, model='m',   lr=9.0e-5, dropout=0.1, sample_cfg=(1.3, 1.2)),
    'l':   dict(IN512, model='l',   lr=8.0e-5, dropout=0.1, sample_cfg=(1.3, 1.2)),
    'xl':  dict(IN512, model='xl',  lr=7.0e-5, dropout=0.1, sample_cfg=(1.3, 1.2)),
    'xxl': dict(IN512, model='xxl', lr=6.5e-5, dropout=0.1, sample_cfg=(1.3, 1.2)),
    # sCD + adaptive VSD: Table 5 (20k iterations, lambda_VSD 1, F_phi at the student's lr and dropout), continuing
    # the sCD student (--student), its tangent warmup done (UNCONFIRMED); Table 6's guidance for FID: 1.2 (S), else 1.0
    's-vsd':   dict(VSD512, model='s',   lr=1.0e-4, dropout=0.0, sample_cfg=(1.2, 1.2)),
    'm-vsd':   dict(VSD512, model='m',   lr=9.0e-5, dropout=0.1, sample_cfg=(1.0, 1.0)),
    'l-vsd':   dict(VSD512, model='l',   lr=8.0e-5, dropout=0.1, sample_cfg=(1.0, 1.0)),
    'xl-vsd':  dict(VSD512, model='xl',  lr=7.0e-5, dropout=0.1, sample_cfg=(1.0, 1.0)),
    'xxl-vsd': dict(VSD512, model='xxl', lr=6.5e-5, dropout=0.1, sample_cfg=(1.0, 1.0)),
    # ImageNet 64 pixels: sCM Table 4, sCD rows (400k iterations, dropout 0, P (-1.0, 1.6), unguided)
    'img64-s':  dict(IN64, model='img64-s',  lr=1.0e-4),
    'img64-m':  dict(IN64, model='img64-m',  lr=9.0e-5),
    'img64-l':  dict(IN64, model='img64-l',  lr=8.0e-5),
    'img64-xl': dict(IN64, model='img64-xl', lr=7.0e-5),
    # CIFAR-10 (CIFAR above): the paper's DDPM++ with ADN; EDM's released DDPM++ as it is, from its pickle
    # (edm-cifar10-32x32-{uncond,cond}-vp.pkl as --teacher, read by edm_pickle.py), the student starting from it
    'cifar10': dict(CIFAR, model='cifar10'),
    'cifar10-edm': dict(CIFAR, model='edm-cifar10'),
    'cifar10-edm-cond': dict(CIFAR, model='edm-cifar10-cond'),
    # CPU presets for Fashion-MNIST (not paper configurations): lr 1e-3 and warmup 200 for runs of a few hundred steps
    'fashion':   dict(FASHION, model='fashion', steps=2_000),
    'fashion-s': dict(FASHION, model='fashion-s', steps=600),
    'fashion-s-vsd': dict(FASHION, model='fashion-s', steps=300, vsd=1.0, warmup_steps=0),  # continues a student
}
def teacher_F(teacher, labels, s=None, guide=None):
    """The teacher's F at the labels, guided at the CFG scales s [B] (None: unguided) against its null label, or
    against a guide network (--guide-net: EDM2's XS unconditional one)."""
    F = lambda u, t: teacher(u, t, labels)
    if s is None:
        return F
    return tf.guided(F, lambda u, t: guide(u, t, labels) if guide else teacher(u, t, torch.full_like(labels, -1)), s)


def scd_loss(net, teacher, x0, labels, *, wnet=None, P_mean, P_std, r, s_max=1.0, c=0.1,
             tangent_norm='rms', grid=None, two_pass=False, guide=None):
    """sCD's loss for one batch (Alg. 1) with the (guided) teacher's PF-ODE velocity as dx_t/dt. net: the student
    with gradient, trigflow.JVP-wrapped (and DDP-wrapped: its one pass gives F_theta, the tangent, and backward's
    all-reduce); wnet(t): w_phi(t);
    r: tangent warmup; s ~ U[1, s_max] is the CFG scale, seen by the student; grid: dsCD's times (App. E); guide: see
    teacher_F."""
    B = x0.shape[0]
    if grid is None:
        t, dt = tf.sample_t(B, P_mean, P_std, device=x0.device), None                 # log-normal proposal
    else:
        t, t_prev = bl.sample_interval(B, grid, P_mean, P_std, device=x0.device)     # dsCD: a grid interval
        dt = t - t_prev
    z = torch.randn_like(x0) * tf.SIGMA_D                                            # z ~ N(0, sigma_d^2 I)
    x_t, _ = tf.forward_process(x0, t, z)                                            # x_t = cos t x0 + sin t z
    s = 1 + (s_max - 1) * torch.rand(B, device=x0.device) if s_max > 1 else None
    with torch.no_grad():                                                            # dx_t/dt from the teacher
        dxdt = tf.velocity(teacher_F(teacher, labels, s, guide), x_t, t)             # with CFG at scale s
    loss = tf.scm_loss if dt is None else functools.partial(bl.dscd_loss, dt=dt)     # App. E: dsCD
    return loss(lambda u, t: net(u, t, labels, s), x_t, t, dxdt, w=None if wnet is None else wnet(t), r=r,
                c=c, tangent_norm=tangent_norm, two_pass=two_pass,
                jvp=lambda u, t, tangents: net(u, t, labels, s, tangents=tangents))


def vsd_losses(net, teacher, fake, x0, labels, s, *, wvsd=None, wfake=None, P_vsd, P_fake, guide=None):
    """sCD + adaptive VSD's extra terms for one batch (§5.2, App. C; trigflow.avsd_loss): the student's 1-step
    samples x_gen = g_theta(z') from t_max, (1) the VSD loss for the student, whose gradient moves x_gen along
    F_phi - F_pretrain, with the teacher guided at the student's own CFG scale s; (2) F_phi's TrigFlow diffusion loss
    (Eq. 4) on the detached samples, with its own adaptive weight. F_phi sees each sample's s (its CFG input,
    zero-initialized: it starts as the teacher), so it models the student's samples at that scale, not their mixture
    over s: a student right at every s is then a fixed point (test_avsd_fake_score_follows_the_guidance_scale). It
    scores in eval mode (no dropout), as FastGen's DMD2 does, and trains in train mode. net: the student with
    gradient (the module, not a DDP wrapper: its gradient joins sCD's in the same backward, which DDP all-reduces
    once); fake: F_phi, DDP-wrapped. Returns (student loss, F_phi's loss, terms)."""
    B, sd = x0.shape[0], tf.SIGMA_D
    x_gen = tf.one_step(lambda u, t: net(u, t, labels, s), torch.randn_like(x0) * sd)     # z' ~ N(0, sigma_d^2 I)
    t = tf.sample_t(B, *P_vsd, device=x0.device)                                    # Table 5: (0.4, 2.0)
    with tu.eval_mode(fake):
        vsd, terms = tf.avsd_loss(x_gen, teacher_F(teacher, labels, s, guide), lambda u, t: fake(u, t, labels, s), t,
                                  torch.randn_like(x_gen) * sd, w=None if wvsd is None else wvsd(t))
    t_fake = tf.sample_t(B, *P_fake, device=x0.device)                              # Table 5: (-0.8, 1.6)
    fake_loss, fake_mse = tf.diffusion_loss(lambda u, t: fake(u, t, labels, s), x_gen.detach(), t_fake,
                                            torch.randn_like(x_gen) * sd, w=None if wfake is None else wfake(t_fake))
    return vsd, fake_loss, dict(terms, fake_loss=fake_loss.detach(), fake_mse=fake_mse.mean())


def build_loss(args, net, ddp_net, ddp_wnet, target, teacher, guide, grid, vsd):
    """loss_fn(x0, labels, step) -> (loss, terms) of one micro-batch, for the method the flags name, built once
    before the loop (as EDM2's training loop builds its loss): sCD (Alg. 1), dsCD on `grid` (App. E), or CD 2023
    (--recipe cd2023, on the grid of its schedule at that step); with --vsd, plus lambda_VSD L_VSD for the student
    and F_phi's own diffusion loss (App. C), one loss of disjoint parameters and one backward."""
    if args.recipe != 'scm':
        def cm_loss(x0, labels, step):
            N = bl.grid_at(args, step)[0]
            loss, terms = bl.cd_loss(ddp_net, target or net, lambda labels, s: teacher_F(teacher, labels, s, guide), x0, labels, bl.discrete_times(N - 1), intervals=args.intervals,
                                  P_mean=args.P_mean, P_std=args.P_std, metric=args.metric, c=args.huber_c,
                                  weighting=args.weighting, s_max=args.s_max)
            return loss, dict(terms, N=torch.tensor(float(N)))
    else:
        def cm_loss(x0, labels, step):
            return scd_loss(ddp_net, teacher, x0, labels, wnet=ddp_wnet, two_pass=args.two_pass, P_mean=args.P_mean,
                            P_std=args.P_std, r=tf.tangent_warmup(step, args.warmup_steps), s_max=args.s_max,
                            c=args.tangent_c, tangent_norm=args.tangent_norm, grid=grid, guide=guide)
    if not vsd:
        return cm_loss

    def cm_and_vsd_loss(x0, labels, step):
        loss, terms = cm_loss(x0, labels, step)
        s = 1 + (args.s_max - 1) * torch.rand(len(labels), device=x0.device) if args.s_max > 1 else None
        loss_vsd, loss_fake, vsd_terms = vsd_losses(net, teacher, vsd['fake'], x0, labels, s, wvsd=vsd['wvsd'],
                                                    wfake=vsd['wfake'], P_vsd=args.P_vsd, P_fake=args.P_fake,
                                                    guide=guide)
        return loss + args.vsd * loss_vsd + loss_fake, dict(terms, **vsd_terms)
    return cm_and_vsd_loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', '--size', dest='preset', choices=sorted(PRESETS), required=True,
                   help='experiment preset: model, data and hyperparameters from the paper\'s tables')
    train_args.add_common_args(p)
    train_args.add_cm_args(p)
    p.add_argument('--s-max', type=float, dest='s_max', help='CFG scales s ~ U[1, s_max] (1 = no guidance)')
    p.add_argument('--sample-cfg', type=float, nargs=2, help='guidance scale with 1 and 2 steps, for the grids and '
                   'sample.py')
    p.add_argument('--vsd', type=float, dest='vsd', help='lambda_VSD: sCD + adaptive VSD with this weight (Table 5: '
                   '1.0); 0 = sCD alone')
    p.add_argument('--P-vsd', type=float, nargs=2, dest='P_vsd', help="L_VSD's proposal (P_mean, P_std)")
    p.add_argument('--P-fake', type=float, nargs=2, dest='P_fake', help="F_phi's diffusion-loss proposal (P_mean, "
                   "P_std)")
    p.add_argument('--student', help='start the student from this checkpoint\'s EMA instead of the teacher\'s: an sCD '
                   'student (sCD + aVSD continues one) or a re-fitted EDM2 U-Net (train_teacher.py --init)')
    p.add_argument('--guide-net', help='guide with this network instead of the teacher\'s null label: EDM2\'s XS '
                   'unconditional pickle for an EDM2 teacher (EDM2 §5)')
    bl.add_recipe_args(p, bl.CD_RECIPES)
    args = train_args.parse_args(p, PRESETS, bl.CD_RECIPES)
    if args.teacher and args.teacher.endswith('.pkl') and args.s_max > 1 and not args.guide_net:
        raise cli.UserError('EDM and EDM2 teachers have no null label: guide with --guide-net (EDM2: its XS '
                            'unconditional pickle), or pass --s-max 1')
    if args.vsd and (args.discrete or args.two_pass):
        raise cli.UserError('--vsd adds to sCD in continuous time, one pass: drop --discrete and --two-pass')
    if args.vsd is not None and not (math.isfinite(args.vsd) and args.vsd >= 0):
        raise cli.UserError(f'--vsd {args.vsd}: lambda_VSD must be finite and >= 0 (Table 5: 1.0; 0 = sCD alone)')
    if args.guide_net and args.s_max <= 1:
        raise cli.UserError('--guide-net guides at CFG scales s > 1, and --s-max 1 never guides: raise --s-max or drop '
                            '--guide-net')
    # Every file the run reads, read and checked before any work: the teacher, a student to continue, a guide.
    teacher_file = ck.read_teacher(args.teacher)
    student_file = args.student and ck.read_teacher(args.student, ('scd', 'teacher'))
    guide_file = args.guide_net and ck.read_teacher(args.guide_net)
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
    ckpt_path = rf.open_run(args, 'scd', rank)
    log_path = os.path.join(args.out, 'log.jsonl') if rank == 0 else None

    # Data: micro-batches of batch_gpu per process, accum of them per step.
    dataset = tu.load_data_all_ranks(args, rank, world)
    batch_gpu, accum = tu.micro_batches(args, world, len(dataset))
    model_kwargs = dict(tu.model_kwargs_for(args, dataset, teacher_file), cfg_embed=args.s_max > 1)
    if args.s_max > 1 and not model_kwargs['label_dim']:
        raise cli.UserError('--s-max > 1 needs a class-conditional model; pass --s-max 1')
    grid = bl.discrete_times(args.discrete) if args.discrete else None            # dsCD's N-step grid (App. E)

    # Networks: the student starts as the teacher's EMA (App. G.2); a guided student's CFG-scale input starts at 0.
    # The same initial weights on every rank; EMA and the adaptive weight w_phi(t) (Eq. 8).
    torch.manual_seed(args.seed)
    net = model.build(model_kwargs).to(device)
    wnet = tf.AdaptiveWeight().to(device)
    # A --student of another time path than the teacher's (EDM2's, re-fitted) needs only the data's shape to agree.
    teacher = ck.load_teacher(teacher_file, model_kwargs, same_architecture=not args.student).to(device)
    ck.start_from(net, ck.load_teacher(student_file, model_kwargs) if args.student else teacher)
    guide = args.guide_net and ck.load_teacher(guide_file, model_kwargs, same_architecture=False).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # A recipe's target theta-: an EMA of theta (CM 2023), or theta itself when mu0 = 0.
    target = copy.deepcopy(net).requires_grad_(False) if args.recipe != 'scm' and args.mu0 > 0 else None
    # sCD + aVSD (App. C): F_phi starts as the teacher's EMA (UNCONFIRMED; as rCM), sees the student's CFG scale s,
    # no EMA, the student's lr; w_psi(t) weighs the VSD loss, w(t) F_phi's diffusion loss.
    vsd = {}
    if args.vsd:
        vsd = dict(fake=model.build(model_kwargs).to(device),           # the student's: the CFG input too
                   wvsd=tf.AdaptiveWeight().to(device), wfake=tf.AdaptiveWeight().to(device))
        if {k: v.shape for k, v in teacher.state_dict().items() if 'cfg' not in k} != \
                {k: v.shape for k, v in vsd['fake'].state_dict().items() if 'cfg' not in k}:
            raise cli.UserError('--vsd: F_phi starts as the teacher, which needs the student\'s architecture')
        ck.start_from(vsd['fake'], teacher)                               # its CFG input starts at 0
    # One optimizer; F_phi (and its w(t)) in a group of its own at the same settings (Table 5: the student's lr), whose
    # gradient norm is logged apart (fake_grad_norm).
    opt = tu.optimizer(args, [dict(params=[*net.parameters(), *wnet.parameters(),
                                           *(vsd['wvsd'].parameters() if vsd else [])], term='grad_norm')] +
                       ([dict(params=[*vsd['fake'].parameters(), *vsd['wfake'].parameters()],
                              term='fake_grad_norm')] if vsd else []))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'fp16')
    extra = dict(vsd, **({'target': target} if target is not None else {}))   # further state a checkpoint keeps
    step, saved_step, window = 0, None, rf.new_window()
    if args.resume:
        step, window = rf.resume(ckpt_path, 'scd', train_args.run_config(args), net, ema, wnet, opt, scaler, log_path,
                                 extra=extra)
        saved_step = step
    # Any torchrun run. DDP wraps tf.JVP(net), whose forward runs the JVP: DDP cannot run inside one (trigflow.JVP).
    wrap = DDP if dist.is_initialized() else (lambda m: m)
    ddp_net, ddp_wnet, ddp_vsd = wrap(tf.JVP(net)), wrap(wnet), {k: wrap(m) for k, m in vsd.items()}
    projected = [m for m in (net, vsd.get('fake')) if m is not None and model_kwargs['arch'] == 'unet']
    # The loss of one micro-batch, built once from the flags: the loop below never asks which method it runs.
    loss_fn = build_loss(args, net, ddp_net, ddp_wnet, target, teacher, guide, grid, ddp_vsd)
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
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=f'scd {args.preset}')
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
            with tu.no_sync([ddp_net, ddp_wnet, *ddp_vsd.values()], micro < accum - 1):  # all-reduce in the last only
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
            F = [lambda u, t, s=s: ema(u, t, grid_labels, torch.full_like(t, s) if args.s_max > 1 else None)
                 for s in args.sample_cfg]                               # the guidance scale for 1 and for 2 steps
            tu.save_grids(args.out, step, dataset, {'1step': tf.sample_consistency(F[0], grid_z),
                                                    '2step': tf.sample_consistency(F[1], grid_z, (tf.T_MAX, tf.T_MID))})
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            state = rf.run_state_all_ranks(step, 'scd', args, model_kwargs, dataset, net, ema, wnet, opt, scaler,
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
