"""Cost of sCM training and sampling, side by side on one model and one batch.

  python bench.py                       # CPU: two U-Net sizes (0.30M and 15.2M parameters), a few minutes
  python bench.py --sizes big stock-dit # the 15.2M U-Net and a 16.6M DiT of stock layers (onepass.OnePass)
  python bench.py --device cuda --precision bf16 --batch auto --sizes s            # on a GPU (gpu_check.sh)

For each model size, one optimizer step of each kind, in rotation so that load on a shared machine hits them alike:
  diffusion      the teacher's step: F forward with gradient, TrigFlow loss (Eq. 4), backward
  sCT            one pass (trigflow.scm_loss): a grad-enabled JVP gives F_theta and its tangent, then backward
  sCD            sCT plus one no-grad forward of the (frozen) teacher for dx_t/dt; a guided teacher costs one more
  sCT/sCD 2-pass two_pass=True: the JVP without grad for the tangent, then a second forward with gradient (the form
                 of every public sCM code)
  sCD stock      one pass through the same network with PyTorch's own rules for every op, as a network of stock
                 layers gets: autograd records the tangent (model.py's primitives keep it from doing so)
  stock-dit      (a size) a 16.6M DiT of stock layers (StockDiT): diffusion, sCD through onepass.OnePass, its two
                 passes with the same rules, 'sCD 2-pass stock', two passes with PyTorch's own rules (what a copier's
                 two-pass code runs), and 'sCD stock', one pass with PyTorch's own rules: what a copier's network gets
  sCD+aVSD       sCD plus App. C's adaptive VSD: the student's 1-step samples (a forward with gradient), the teacher
                 and the fake score F_phi at noised samples (no grad), and F_phi's diffusion step (train_scd.py --vsd)
and sampling: 1 and 2 consistency steps against the teacher's EDM Heun with 18 steps (35 NFE).
Reports the median time of each, the ratio to the diffusion step, and the peak memory of a step above what the model,
its optimizer state and the batch hold (CUDA: max_memory_allocated; CPU: the resident-set high-water mark with
glibc returning every freed block at once, MALLOC_MMAP_THRESHOLD_; each kind in a fresh process, after a warm-up step).
Then where the sCD step's time goes: a no-grad forward, the JVP pass alone, and with PyTorch's rules.

On CPU the timing runs with glibc's malloc keeping freed memory (KEEP_MEMORY), as PyTorch's CUDA caching allocator
does: by default glibc hands large freed blocks back to the OS, and the next step faults them in again, zeroed. That
cost depends on how a kind allocates, not on its arithmetic (README: Cost), and a GPU never pays it. --glibc-default
measures with it.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

import model
import onepass
import trigflow as tf

SIZES = {   # name -> U-Net kwargs (28x28 grayscale like Fashion-MNIST, 32x32 RGB for the bigger one)
    'fashion-s': model.UNET_PRESETS['fashion-s'],
    'big': dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=96, channel_mult=(1, 2, 2),
                num_blocks=2, attn_resolutions=(8,), dropout_res=16),
    's': model.UNET_PRESETS['s'],   # sCM's S: 280M parameters on 64x64x4 SD-VAE latents (ImageNet 512), for a GPU
    'stock-dit': dict(img_resolution=32, img_channels=3, label_dim=10, hidden=384, depth=6, heads=6),  # StockDiT 16M
    'stock-dit-tiny': dict(img_resolution=16, img_channels=1, label_dim=10, hidden=32, depth=1, heads=2),  # tests
}


class StockDiT(torch.nn.Module):
    """DiT as published (Peebles & Xie 2023, its models.py), written only with stock layers -- nn.Conv2d, nn.Linear,
    nn.LayerNorm, nn.GELU, nn.SiLU, nn.Embedding, F.scaled_dot_product_attention -- and the paper's time input t: a
    network a copier brings, unedited, for onepass.OnePass. Returns F(u, t) [B, C, H, W]."""

    def __init__(self, img_resolution=32, img_channels=3, label_dim=10, hidden=384, depth=6, heads=6, patch=2):
        super().__init__()
        nn, self.patch, self.heads, self.C = torch.nn, patch, heads, img_channels
        self.x_embed = nn.Conv2d(img_channels, hidden, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (img_resolution // patch) ** 2, hidden) * 0.02)
        self.register_buffer('freqs', torch.exp(-math.log(10000) * torch.arange(128) / 128))
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(label_dim + 1, hidden) if label_dim else None          # the last: the null label
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1, blk.norm2 = (nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6) for _ in range(2))
            blk.qkv, blk.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
            blk.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate='tanh'),
                                    nn.Linear(4 * hidden, hidden))
            blk.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch * patch * img_channels)

    def forward(self, u, t, labels=None):
        B, _, H, W = u.shape
        x = self.x_embed(u).flatten(2).transpose(1, 2) + self.pos
        arg = t.reshape(-1, 1) * self.freqs
        c = self.t_embed(torch.cat([arg.cos(), arg.sin()], dim=1))
        if self.y_embed is not None and labels is not None:
            c = c + self.y_embed(torch.where(labels < 0, self.y_embed.num_embeddings - 1, labels))
        for blk in self.blocks:
            s1, g1, a1, s2, g2, a2 = blk.ada(c).unsqueeze(1).chunk(6, dim=2)
            h = blk.norm1(x) * (1 + a1) + s1
            q, k, v = blk.qkv(h).reshape(B, -1, 3, self.heads, x.shape[-1] // self.heads).permute(2, 0, 3, 1, 4)
            h = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
            x = x + g1 * blk.proj(h)
            x = x + g2 * blk.mlp(blk.norm2(x) * (1 + a2) + s2)
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=2)
        x = self.out(self.norm(x) * (1 + scale) + shift)
        p, n = self.patch, H // self.patch
        return x.reshape(B, n, n, p, p, self.C).permute(0, 5, 1, 3, 2, 4).reshape(B, self.C, H, W)


@contextlib.contextmanager
def stock_rules(on=True):
    """Every model.py primitive as the plain op, under PyTorch's own JVP rules: what a network of stock layers gets
    (attention: PyTorch's SDPA, which trigflow restricts to its math path under the JVP)."""
    primitive = onepass._primitive
    if on:
        onepass._primitive = model._primitive = lambda op, rule, *xs: (
            torch.nn.functional.scaled_dot_product_attention(*xs) if op is onepass._sdpa else op(*xs))
    try:
        yield
    finally:
        onepass._primitive = model._primitive = primitive


def make_step(kind, net, teacher, wnet, opt, x0, labels, amp):
    """One optimizer step of `kind` on the batch x0 (fresh t and z each call)."""
    if kind == 'sCD+aVSD':                                  # F_phi starts as the teacher, with its own optimizer
        fake = copy.deepcopy(teacher).requires_grad_(True).train()
        fake_opt = torch.optim.Adam(fake.parameters(), lr=1e-4)

    # A network of stock layers (StockDiT) gets the one pass through onepass.OnePass; 'sCD stock' runs it without.
    one_pass = tf.JVP(net, mode=onepass.OnePass)
    jvp = (lambda u, t, tg: one_pass(u, t, labels, tangents=tg)) if isinstance(net, StockDiT) and \
        not kind.endswith('stock') else None

    def step():
        B = x0.shape[0]
        t = tf.sample_t(B, -0.8, 1.6, device=x0.device)
        z = torch.randn_like(x0) * tf.SIGMA_D
        F = lambda u, t: net(u, t, labels)
        with amp(), stock_rules(kind.endswith('stock')):
            if kind == 'diffusion':
                loss, _ = tf.diffusion_loss(F, x0, t, z, w=wnet(t))
            else:
                x_t, dxdt = tf.forward_process(x0, t, z)
                if kind.startswith('sCD'):
                    with torch.no_grad():
                        dxdt = tf.velocity(lambda u, t: teacher(u, t, labels), x_t, t)
                loss, _ = tf.scm_loss(F, x_t, t, dxdt, w=wnet(t), two_pass='2-pass' in kind, jvp=jvp)
                if kind == 'sCD+aVSD':
                    x_gen = tf.one_step(F, torch.randn_like(x0) * tf.SIGMA_D)
                    F_fake = lambda u, t: fake(u, t, labels)
                    vsd, _ = tf.avsd_loss(x_gen, lambda u, t: teacher(u, t, labels), F_fake,
                                          tf.sample_t(B, 0.4, 2.0, device=x0.device), z, w=wnet(t))
                    fake_loss, _ = tf.diffusion_loss(F_fake, x_gen.detach(), t, z, w=wnet(t))
                    loss = loss + vsd + fake_loss
        opt.zero_grad(set_to_none=True)
        if kind == 'sCD+aVSD':
            fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if kind == 'sCD+aVSD':
            fake_opt.step()

    def part():  # the pieces of an sCD step, to see where its time goes
        B = x0.shape[0]
        t = tf.sample_t(B, -0.8, 1.6, device=x0.device)
        x_t, dxdt = tf.forward_process(x0, t, torch.randn_like(x0) * tf.SIGMA_D)
        with amp(), torch.no_grad(), stock_rules(kind.endswith('stock')):
            if kind == 'forward':
                net(x_t / tf.SIGMA_D, t, labels)
            else:  # the JVP pass alone: F and its tangent, as in scm_loss
                tf.scm_tangent(lambda u, t: net(u, t, labels), x_t, t, dxdt, jvp=jvp)
    return part if kind in PARTS else step


KINDS = ('diffusion', 'sCT', 'sCD', 'sCT 2-pass', 'sCD 2-pass', 'sCD stock', 'sCD+aVSD')
STOCK_KINDS = ('diffusion', 'sCD', 'sCD 2-pass', 'sCD 2-pass stock', 'sCD stock')   # stock-dit: sCD through onepass.OnePass
PARTS = ('forward', 'JVP pass', 'JVP pass, stock')   # timed alongside the steps (no memory measured)


KEEP_MEMORY = {'MALLOC_MMAP_THRESHOLD_': str(2 ** 32), 'MALLOC_TRIM_THRESHOLD_': str(2 ** 36),
               'MALLOC_TOP_PAD_': str(2 ** 30)}   # glibc: no mmap'd blocks, never trim, grow the heap 1 GiB at a time


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def setup(args, size):
    device = torch.device(args.device)
    torch.manual_seed(0)
    kw = SIZES[size]
    make = StockDiT if size.startswith('stock-dit') else model.UNet
    net = make(**kw).to(device)
    teacher = make(**kw).to(device).requires_grad_(False).eval()
    wnet = tf.AdaptiveWeight().to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(wnet.parameters()), lr=1e-4)
    x0 = torch.rand(args.batch, kw['img_channels'], kw['img_resolution'], kw['img_resolution'], device=device) * 2 - 1
    labels = torch.randint(0, kw['label_dim'], (args.batch,), device=device)
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.precision]
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else (lambda: torch.autocast(device.type, enabled=False))
    return device, net, teacher, wnet, opt, x0, labels, amp


def child(args):
    """Measure the peak memory of one kind in this (fresh) process, after a warm-up step; print one JSON line."""
    device, net, teacher, wnet, opt, x0, labels, amp = setup(args, args.size)
    step = make_step(args.kind, net, teacher, wnet, opt, x0, labels, amp)
    step()                                 # warm-up: Adam's state, one-time allocations
    opt.zero_grad(set_to_none=True)
    sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        with open('/proc/self/clear_refs', 'w') as f:   # resets the high-water mark VmHWM to the current RSS
            f.write('5')
        base = status_mb('VmRSS')
        step()
        peak = status_mb('VmHWM')
    print(json.dumps(dict(kind=args.kind, extra_mb=peak - base)))


def status_mb(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':')) / 1024


def measure_memory(args, size, kind, check=True):
    cmd = [sys.executable, __file__, '--child', '--size', size, '--kind', kind, '--device', args.device,
           '--batch', str(args.batch), '--precision', args.precision]
    env = {k: v for k, v in os.environ.items() if k not in KEEP_MEMORY}
    env['MALLOC_MMAP_THRESHOLD_'] = '65536'                  # freed blocks go back to the OS at once: RSS = live memory
    p = subprocess.run(cmd, capture_output=True, text=True, check=check, env=env)
    return json.loads(p.stdout.strip().splitlines()[-1])['extra_mb'] if p.returncode == 0 else None


def largest_batch(args, size):
    """The largest power-of-two batch (<= 1024) at which two sCD steps fit in memory, each try in a fresh process."""
    for b in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if measure_memory(argparse.Namespace(**dict(vars(args), batch=b)), size, 'sCD', check=False) is not None:
            return b
    raise SystemExit(f'error: not even batch 1 of {size} fits')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', nargs='+', default=['fashion-s', 'big'], choices=sorted(SIZES))
    p.add_argument('--batch', default='32', help="batch size, or 'auto': the largest power of two that fits an sCD step")
    p.add_argument('--rounds', type=int, default=5, help='timed rounds (after one warm-up round)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', choices=['fp32', 'bf16', 'fp16'], default='fp32')
    p.add_argument('--glibc-default', action='store_true', help="CPU: time with glibc's default malloc settings")
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--size', help=argparse.SUPPRESS)
    p.add_argument('--kind', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.batch = int(args.batch)
        return child(args)
    keep = args.device == 'cpu' and not args.glibc_default
    if keep and any(os.environ.get(k) != v for k, v in KEEP_MEMORY.items()):   # glibc reads them at start: restart
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], dict(os.environ, **KEEP_MEMORY))
    print(f'device {args.device} ({torch.get_num_threads()} threads), batch {args.batch}, {args.precision}, '
          f'median of {args.rounds} rounds' + (', glibc keeping freed memory' if keep else ''))
    auto = args.batch == 'auto'
    for size in args.sizes:
        args.batch = largest_batch(args, size) if auto else int(args.batch)
        kinds = list(STOCK_KINDS if size.startswith('stock-dit') else KINDS)
        device, net, teacher, wnet, opt, x0, labels, amp = setup(args, size)
        n_params = sum(p.numel() for p in net.parameters()) / 1e6
        steps = {k: make_step(k, net, teacher, wnet, opt, x0, labels, amp) for k in kinds + list(PARTS)}
        times = {k: [] for k in steps}
        for r in range(args.rounds + 1):                               # round 0 warms up
            for k in steps:
                sync(device)
                t0 = time.perf_counter()
                steps[k]()
                sync(device)
                if r:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: measure_memory(args, size, k) for k in kinds}
        print(f'\n{size}: {type(net).__name__} {n_params:.2f}M parameters, {tuple(x0.shape[1:])}, batch {args.batch}'
              + (' (the largest that fits)' if auto else ''))
        print(f'  {"step":16s} {"s/step":>8s} {"x diffusion":>12s} {"images/s":>9s} {"peak MB":>9s} {"x diffusion":>12s}')
        for k in kinds:
            print(f'  {k:16s} {med[k]:8.3f} {med[k] / med["diffusion"]:12.2f} {args.batch / med[k]:9.1f} {mem[k]:9.0f} '
                  f'{mem[k] / mem["diffusion"]:12.2f}')
        pairs = [(one, two) for one in ('sCT', 'sCD') for two in (one + ' 2-pass', one + ' 2-pass stock') if two in kinds]
        print('  one pass / two passes, the median of the rounds\' own ratios (each round times both, back to back): ' +
              ', '.join(f'{one} / {two} {statistics.median(a / b for a, b in zip(times[one], times[two])):.3f} (rounds '
                        + ' '.join(f'{a / b:.2f}' for a, b in zip(times[one], times[two])) + ')' for one, two in pairs))
        fwd, jvp, jvp_stock = med['forward'], med['JVP pass'], med['JVP pass, stock']
        print(f'  where the time goes: a no-grad forward {fwd:.3f} s, the JVP pass alone {jvp:.3f} s ({jvp / fwd:.2f} '
              f'forwards; {jvp_stock / fwd:.2f} with PyTorch\'s rules), the diffusion step {med["diffusion"] / fwd:.2f} '
              f'forwards;\n  so one-pass sCD ~ teacher forward + JVP pass + backward (a diffusion step less its forward) = '
              f'{(jvp + med["diffusion"]) / med["diffusion"]:.2f}x the diffusion step; two passes add a forward: '
              f'{(fwd + jvp + med["diffusion"]) / med["diffusion"]:.2f}x')
        net.eval()
        z = torch.randn_like(x0) * tf.SIGMA_D
        F = lambda u, t: net(u, t, labels)
        samplers = {'1-step': lambda: tf.sample_consistency(F, z),
                    '2-step': lambda: tf.sample_consistency(F, z, (tf.T_MAX, tf.T_MID)),
                    'Heun 35 NFE': lambda: tf.sample_heun(F, z, 18)}
        wall = {k: [] for k in samplers}
        with torch.no_grad(), amp():
            for r in range(3):
                for k, fn in samplers.items():
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    wall[k].append(time.perf_counter() - t0)
        wall = {k: statistics.median(v) for k, v in wall.items()}
        for k in ('1-step', '2-step'):
            print(f'  sampling {k}: {wall[k]:.3f} s, {wall["Heun 35 NFE"] / wall[k]:.1f}x faster than Heun 35 NFE '
                  f'({wall["Heun 35 NFE"]:.3f} s), batch {args.batch}')
        net.train()


if __name__ == '__main__':
    main()
