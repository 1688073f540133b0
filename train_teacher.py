"""Train the TrigFlow diffusion teacher that sCT and sCD start from (sCM §2, Eq. 4; App. G.1).

  python train_teacher.py --preset mnist-s                                   # Fashion-MNIST on a CPU
  torchrun --nproc_per_node=8 train_teacher.py --size xl --data in512-latents.npy  # ImageNet 512 latents, Table 5

The network predicts F with x0 = cos(t) x_t - sin(t) sigma_d F; the loss is the TrigFlow flow-matching loss with
EDM2's learned adaptive weighting, a log-normal proposal over sigma = sigma_d tan t, and (ImageNet 512) label
dropout 0.1 so that the teacher supports classifier-free guidance.
"""
import torch

import trigflow as tf
import training


def _imagenet(model, lr, steps, dropout, ema_std, P, t_ref, label_dropout):
    # EDM2 config G as sCM uses it: Adam (0.9, 0.99, 1e-11), lr alpha_ref / sqrt(max(k / t_ref, 1)) after a 10 Mimg
    # rampup, batch 2048, fp16 network body.
    return dict(model=model, data=None, batch=2048, steps=steps, lr=lr, lr_decay_steps=t_ref, lr_rampup_mimg=10.0,
                optimizer='adam', betas=(0.9, 0.99), eps=1e-11, ema_std=ema_std, ema_halflife_mimg=0.0,
                dropout=dropout, P_mean=P[0], P_std=P[1], precision='fp16', label_dropout=label_dropout)


PRESETS = {
    # ImageNet 512x512, SD-VAE latents: sCM Table 5, diffusion rows (lr, iterations, dropout, P, teacher EMA sigma_rel)
    's':   _imagenet('s',   1.0e-2, 1_048_000, 0.0, 0.025, (-0.4, 1.0), 70_000, 0.1),
    'm':   _imagenet('m',   9.0e-3, 1_048_000, 0.1, 0.030, (-0.4, 1.0), 70_000, 0.1),
    'l':   _imagenet('l',   8.0e-3,   696_000, 0.1, 0.015, (-0.4, 1.0), 70_000, 0.1),
    'xl':  _imagenet('xl',  7.0e-3,   598_000, 0.1, 0.020, (-0.4, 1.0), 70_000, 0.1),
    'xxl': _imagenet('xxl', 6.5e-3,   376_000, 0.1, 0.015, (-0.4, 1.0), 70_000, 0.1),
    # ImageNet 64x64 pixels: sCM Table 4, diffusion rows (no guidance at 64x64)
    'img64-s':  _imagenet('img64-s',  1.0e-2, 1_048_000, 0.0, 0.075, (-0.8, 1.6), 35_000, 0.0),
    'img64-m':  _imagenet('img64-m',  9.0e-3, 1_486_000, 0.1, 0.060, (-0.8, 1.6), 35_000, 0.0),
    'img64-l':  _imagenet('img64-l',  8.0e-3,   761_000, 0.1, 0.040, (-0.8, 1.6), 35_000, 0.0),
    'img64-xl': _imagenet('img64-xl', 7.0e-3,   540_000, 0.1, 0.040, (-0.8, 1.6), 35_000, 0.0),
    # CIFAR-10: sCM App. G (batch 512, 400k iterations, Adam lr 1e-3, (0.9, 0.999), 1e-8, dropout 0.13) with EDM's
    # CIFAR defaults it follows (EMA half-life 0.5 Mimg, 10 Mimg lr rampup, fp32). P = EDM's (-1.2, 1.2): UNCONFIRMED.
    'cifar10': dict(model='cifar10', data='cifar10', batch=512, steps=400_000, lr=1e-3, lr_decay_steps=0,
                    lr_rampup_mimg=10.0, optimizer='adam', betas=(0.9, 0.999), eps=1e-8, ema_std=0.0,
                    ema_halflife_mimg=0.5, dropout=0.13, P_mean=-1.2, P_std=1.2, precision='fp32', label_dropout=0.0),
    # CPU presets for Fashion-MNIST (not paper configurations): EDM2-style lr, short rampup and decay.
    'mnist':   dict(model='mnist', data='fashion-mnist', batch=128, steps=20_000, lr=1e-2, lr_decay_steps=4_000,
                    lr_rampup_mimg=0.05, optimizer='adam', betas=(0.9, 0.99), eps=1e-8, ema_std=0.05,
                    ema_halflife_mimg=0.0, dropout=0.0, P_mean=-0.8, P_std=1.6, precision='fp32', label_dropout=0.1),
    'mnist-s': dict(model='mnist-s', data='fashion-mnist', batch=128, steps=3_000, lr=1e-2, lr_decay_steps=1_000,
                    lr_rampup_mimg=0.025, optimizer='adam', betas=(0.9, 0.99), eps=1e-8, ema_std=0.05,
                    ema_halflife_mimg=0.0, dropout=0.0, P_mean=-0.8, P_std=1.6, precision='fp32', label_dropout=0.1),
}


def add_args(p):
    p.add_argument('--label-dropout', type=float, help='probability of training with the null label (CFG)')


def main():
    args = training.parse_args(__doc__, PRESETS, add_args)
    run = training.Run(args, method='teacher', script='teacher')
    run.finish_setup()

    def loss(x0, labels, step):
        if args.label_dropout:
            labels = torch.where(torch.rand(labels.shape, device=labels.device) < args.label_dropout, -1, labels)
        t = tf.sample_t(x0.shape[0], args.P_mean, args.P_std, device=x0.device)
        z = torch.randn_like(x0) * tf.SIGMA_D
        F = lambda u, t: run.ddp_net(u, t, labels)
        loss, mse = tf.diffusion_loss(F, x0, t, z, w=run.ddp_wnet(t))
        return loss, dict(loss=loss.detach(), mse=mse.mean())

    def sample(net, z, labels):                     # the paper's teacher sampler: Heun, 18 steps = 35 NFE
        return {'heun35': tf.sample_heun(lambda u, t: net(u, t, labels), z, num_steps=18)}

    run.train(loss, sample)


if __name__ == '__main__':
    training.main_guard(main)
