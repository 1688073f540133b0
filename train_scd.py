"""sCD: continuous-time consistency distillation from a TrigFlow teacher (sCM Alg. 1, App. G).

  python train_scd.py --preset mnist-s --teacher runs/teacher-mnist-s/checkpoint.pt
  torchrun --nproc_per_node=8 train_scd.py --size xl --data in512-latents.npy --teacher runs/teacher-xl/checkpoint.pt

The student starts from the teacher's EMA weights and learns f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t/sigma_d, t)
so that f is constant along the teacher's PF-ODE: dx_t/dt = sigma_d F_teacher(x_t/sigma_d, t), with classifier-free
guidance at a scale s ~ U[1, s_max] that the student also sees (ImageNet 512). --discrete N trains the discrete-time
dsCD baseline (App. E) with the same improvements instead.
"""
import torch

import trigflow as tf
import training

_cm = training.cm_preset
PRESETS = {
    # ImageNet 512 latents: sCM Table 5, sCD rows (200k iterations, dropout 0%/10%, max CFG scale 2.0, P (-0.8, 1.6))
    's':   _cm('s',   None, 1.0e-4, 200_000, 0.0, (-0.8, 1.6), 70_000, s_max=2.0),
    'm':   _cm('m',   None, 9.0e-5, 200_000, 0.1, (-0.8, 1.6), 70_000, s_max=2.0),
    'l':   _cm('l',   None, 8.0e-5, 200_000, 0.1, (-0.8, 1.6), 70_000, s_max=2.0),
    'xl':  _cm('xl',  None, 7.0e-5, 200_000, 0.1, (-0.8, 1.6), 70_000, s_max=2.0),
    'xxl': _cm('xxl', None, 6.5e-5, 200_000, 0.1, (-0.8, 1.6), 70_000, s_max=2.0),
    # ImageNet 64 pixels: sCM Table 4, sCD rows (400k iterations, dropout 0, P (-1.0, 1.6), no guidance)
    'img64-s':  _cm('img64-s',  None, 1.0e-4, 400_000, 0.0, (-1.0, 1.6), 35_000, s_max=1.0),
    'img64-m':  _cm('img64-m',  None, 9.0e-5, 400_000, 0.0, (-1.0, 1.6), 35_000, s_max=1.0),
    'img64-l':  _cm('img64-l',  None, 8.0e-5, 400_000, 0.0, (-1.0, 1.6), 35_000, s_max=1.0),
    'img64-xl': _cm('img64-xl', None, 7.0e-5, 400_000, 0.0, (-1.0, 1.6), 35_000, s_max=1.0),
    # CIFAR-10: sCM App. G: RAdam lr 1e-4 (0.9, 0.99), 1e-8, no schedule, batch 512, P (-1.0, 1.4), dropout 0,
    # EMA half-life 0.5 Mimg, fp32 (UNCONFIRMED); the iteration count is not stated (UNCONFIRMED: 400k)
    'cifar10': _cm('cifar10', 'cifar10', 1e-4, 400_000, 0.0, (-1.0, 1.4), 0, batch=512, optimizer='radam',
                   eps=1e-8, ema_std=0.0, ema_halflife_mimg=0.5, precision='fp32', s_max=1.0),
    # CPU presets for Fashion-MNIST (not paper configurations): lr 1e-3 and warmup 200 for runs of a few hundred steps
    'mnist':   _cm('mnist',   'fashion-mnist', 1e-3, 2_000, 0.0, (-1.0, 1.6), 0, batch=128, eps=1e-8,
                   precision='fp32', warmup_steps=200, s_max=2.0),
    'mnist-s': _cm('mnist-s', 'fashion-mnist', 1e-3, 600, 0.0, (-1.0, 1.6), 0, batch=128, eps=1e-8,
                   precision='fp32', warmup_steps=200, s_max=2.0),
}


def add_args(p):
    training.add_cm_args(p)
    p.add_argument('--s-max', type=float, dest='s_max', help='CFG scales s ~ U[1, s_max] (1 = no guidance)')


def main():
    args = training.parse_args(__doc__, PRESETS, add_args)
    cfg = args.s_max > 1
    run = training.Run(args, method='scd', script='scd', cfg_embed=cfg)
    if cfg and not run.model_kwargs['label_dim']:
        raise training.UserError('--s-max > 1 needs a class-conditional model; pass --s-max 1')
    teacher = training.load_teacher(args.teacher, run.model_kwargs).to(run.device)
    run.finish_setup(init_state=teacher.state_dict())
    grid = tf.discrete_times(args.discrete) if args.discrete else None

    def loss(x0, labels, step):
        B = x0.shape[0]
        if grid is None:
            t, dt = tf.sample_t(B, args.P_mean, args.P_std, device=x0.device), None
        else:
            t, t_prev = tf.sample_t_discrete(B, grid, args.P_mean, args.P_std, device=x0.device)
            dt = t - t_prev
        z = torch.randn_like(x0) * tf.SIGMA_D
        x_t, _ = tf.forward_process(x0, t, z)
        s = 1 + (args.s_max - 1) * torch.rand(B, device=x0.device) if cfg else None
        with torch.no_grad():                                            # the teacher's PF-ODE velocity, with CFG
            F_teacher = lambda u, t: teacher(u, t, labels)
            if cfg:
                F_teacher = tf.guided(F_teacher, lambda u, t: teacher(u, t, torch.full_like(labels, -1)), s)
            dxdt = tf.velocity(F_teacher, x_t, t)
        F = lambda u, t: run.ddp_net(u, t, labels, s)                   # with gradient, through DDP
        F_minus = lambda u, t: run.net(u, t, labels, s)                  # the tangent pass: no DDP, no grad
        return tf.scm_loss(F, x_t, t, dxdt, F_minus=F_minus, w=run.ddp_wnet(t), dt=dt, c=args.tangent_c,
                           tangent_norm=args.tangent_norm, r=tf.tangent_warmup(step, args.warmup_steps))

    def sample(net, z, labels):
        s = torch.full((z.shape[0],), args.sample_cfg, device=z.device) if cfg else None
        F = lambda u, t: net(u, t, labels, s)
        return {'1step': tf.sample_consistency(F, z), '2step': tf.sample_consistency(F, z, (tf.T_MAX, tf.T_MID))}

    run.train(loss, sample)


if __name__ == '__main__':
    training.main_guard(main)
