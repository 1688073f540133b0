"""Networks for sCM (Lu & Song, ICLR 2025): an EDM2-style U-Net, a DiT and a small MLP, with the paper's
time conditioning (§4.1, App. G.1), and attention that is exact under forward-mode JVP. Imports torch only.

Every network is called as  F = net(u, t, labels=None, s=None)  and returns F with the shape of u:
  u       x_t / sigma_d, the unit-variance input of Eq. 23
  t       TrigFlow time [B] in [0, pi/2]; c_noise(t) = t goes into a positional embedding (§4.1)
  labels  class indices [B] (long); -1 is "no label", the null class of classifier-free guidance
  s       CFG scale [B] seen by a guided sCD student (App. G, ImageNet 512); None means s = 1

The forward pass is functional (no in-place ops on activations, no weight updates inside forward), so that
torch.func.jvp works in train and eval mode, in fp32 and under bf16/fp16 autocast. EDM2's forced weight
normalization moved out of forward into `project_weights_()`, which a trainer calls after each optimizer step.

Choices made here where the sCM paper is silent:
  * c_noise(t) = t is fed raw (no x1000) to a positional embedding: its frequencies then match the paper's
    "Fourier scale ~0.02" (§4.1): with max_positions 10^4, the mean frequency over channels is ~0.1 rad per unit t.
  * Adaptive double normalization (ADN, §4.1) y = norm(x) * pnorm(s(t)) + pnorm(b(t)). In the DiT and the MLP,
    which have a shift natively, both terms are used. EDM2's block has a scale only (c = 1 + gain * W emb); we
    normalize both the feature map and that scale, and add no shift: a shift would add ~5% parameters, while
    the paper's Tables 4-5 list EDM2's counts (S, M exactly; L, XL, XXL 0.10-0.24M above EDM2's code), and these
    networks have exactly EDM2's (test_param_counts).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as nnf

# The one-pass primitives and their tangent rules (onepass.py), under the names the networks below use.
from onepass import (_primitive, _wide, affine, attention, dropout, gelu, group_norm, layer_norm, mul,  # noqa: F401
                     mul_scalar, silu)

# Magnitude-preserving primitives (EDM2: Karras et al., "Analyzing and Improving the Training Dynamics of
# Diffusion Models", CVPR 2024). Statistics are taken in at least fp32, so fp64 stays fp64 in the tests.


def normalize(x, dim=None, eps=1e-4):
    """Scale x to unit RMS over `dim` (default: all but the first): EDM2's normalize, used for pixel norm and
    weight normalization (EDM2 Eq. 47/66): y = x / n, n = eps + ||x|| sqrt(k / N) (k of the N elements remain).
    Tangent: (x_t - x sqrt(k / N) <x, x_t> / (||x|| n)) / n."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    return _primitive(lambda x: _normalize(x, dim, eps), lambda xs, ts, y: _normalize_tangent(xs, ts, dim, eps), x)


def _normalize(x, dim, eps):
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_wide(x.dtype))
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def _normalize_tangent(xs, ts, dim, eps):
    (x,), (x_t,) = xs, ts
    x, x_t = x.to(_wide(x.dtype)), x_t.to(_wide(x.dtype))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    c = math.sqrt(norm.numel() / x.numel())
    n = eps + c * norm
    coef = c * (x * x_t).sum(dim, keepdim=True) / (norm.clamp(min=torch.finfo(x.dtype).tiny) * n)
    return torch.addcmul(x_t, x, coef, value=-1).div_(n)


def pnorm(v, eps=1e-8):
    """PixelNorm over channels, v / sqrt(mean_c v^2 + eps) (Karras et al. 2018, §4.2), applied to the modulation
    vectors of ADN (sCM §4.1). Smooth at v = 0, so a zero-initialized shift has a finite JVP.
    Tangent: r (v_t - v r^2 mean_c(v v_t)), r = (mean_c v^2 + eps)^(-1/2)."""
    return _primitive(lambda v: _pnorm(v, eps), lambda xs, ts, y: _pnorm_tangent(xs, ts, eps), v)


def _pnorm(v, eps):
    v2 = v.to(_wide(v.dtype)).square().mean(dim=1, keepdim=True)
    return v * torch.rsqrt(v2 + eps).to(v.dtype)


def _pnorm_tangent(xs, ts, eps):
    (v,), (v_t,) = xs, ts
    v, v_t = v.to(_wide(v.dtype)), v_t.to(_wide(v.dtype))
    r = torch.rsqrt(v.square().mean(1, keepdim=True) + eps)
    return r * (v_t - v * r ** 2 * (v * v_t).mean(1, keepdim=True))


def mp_silu(x):
    """Magnitude-preserving SiLU (EDM2 Eq. 81)."""
    return mul_scalar(silu(x), 1 / 0.596)


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving sum (EDM2 Eq. 88)."""
    return mul_scalar(a, (1 - t) / math.sqrt((1 - t) ** 2 + t ** 2)) + mul_scalar(b, t / math.sqrt((1 - t) ** 2 + t ** 2))


def mp_cat(a, b, t=0.5):
    """Magnitude-preserving concatenation along channels (EDM2 Eq. 103)."""
    Na, Nb = a.shape[1], b.shape[1]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([mul_scalar(a, C / math.sqrt(Na) * (1 - t)), mul_scalar(b, C / math.sqrt(Nb) * t)], dim=1)


def resample(x, mode='keep'):
    """EDM2's resampling with the [1,1] filter: 2x2 average pooling down, nearest-neighbour up."""
    if mode == 'down':
        return nnf.avg_pool2d(x, 2)
    if mode == 'up':
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return x


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of c = c_noise(t) = t (sCM §4.1, replacing Fourier features whose
    frequency scale 16 makes the tangent unstable, Fig. 4), computed in fp32 or wider even under autocast.
    unit_rms: times sqrt(2), as EDM2's magnitude-preserving MPFourier that it replaces in the U-Net; EDM's DDPM++
    (its PositionalEmbedding) and DiT (timestep_embedding) do not scale."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False, unit_rms=False):
        super().__init__()
        half = num_channels // 2                  # endpoint: the last frequency is 1 / max_positions (EDM's DDPM++)
        self.register_buffer('freqs', (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) /
                                                              (half - endpoint)))
        self.gain = math.sqrt(2) if unit_rms else 1.0

    def forward(self, c):
        x = c.to(_wide(c.dtype)).reshape(-1, 1) * self.freqs.to(_wide(c.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1) * self.gain


class Linear(nn.Linear):
    """nn.Linear through affine()."""

    def forward(self, x):
        return affine(x, self.weight, self.bias)


class SiLU(nn.Module):
    """nn.SiLU through silu()."""

    def forward(self, x):
        return silu(x)


class MPFourier(nn.Module):
    """EDM2's magnitude-preserving Fourier features cos(2 pi (f c + phi)) sqrt(2), f ~ N(0, 1), phi ~ U[0, 1) fixed
    (EDM2 Eq. 75): its checkpoints' time embedding, which sCM replaces (§4.1) for students. Computed in fp32."""

    def __init__(self, num_channels):
        super().__init__()
        self.register_buffer('freqs', 2 * math.pi * torch.randn(num_channels))
        self.register_buffer('phases', 2 * math.pi * torch.rand(num_channels))

    def forward(self, c):
        return (c.to(_wide(c.dtype)).reshape(-1, 1) * self.freqs + self.phases).cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Magnitude-preserving convolution, or linear layer when kernel=() (EDM2 Eq. 47): the weight is normalized
    per output channel inside forward (functional). `project_()` is EDM2's forced weight normalization
    (Eq. 66), done by the trainer after the optimizer step instead of inside forward."""

    def __init__(self, in_channels, out_channels, kernel=()):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(_wide(self.weight.dtype))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        return affine(x, w.to(x.dtype))

    @torch.no_grad()
    def project_(self):
        self.weight.copy_(normalize(self.weight.to(_wide(self.weight.dtype))))


def one_hot(labels, num_classes):
    """One-hot rows for class indices; -1 (the CFG null class) gives a zero row, as in EDM2."""
    return nnf.one_hot(labels.clamp(min=0), num_classes).to(torch.float32) * (labels >= 0).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------
# EDM2 U-Net (EDM2 Fig. 21) with sCM's time conditioning and ADN.


class Block(nn.Module):
    """EDM2 encoder/decoder block (EDM2 Fig. 21). Changes for sCM: the modulation is an adaptive double
    normalization (§4.1), y = mp_silu(norm(y) * pnorm(1 + gain W emb)); dropout is set per resolution by the U-Net;
    the activation clip is out-of-place."""

    def __init__(self, in_channels, out_channels, emb_channels,
                 flavor='enc',            # 'enc' or 'dec'
                 resample_mode='keep',    # 'keep', 'down' or 'up'
                 attention=False,         # self-attention after the residual branch
                 channels_per_head=64,    # EDM2 default
                 dropout=0.0,             # dropout probability in the residual branch
                 res_balance=0.3,         # EDM2 defaults for the magnitude-preserving sums
                 attn_balance=0.3,
                 clip_act=256,
                 edm2=False,              # EDM2's own modulation y * (1 + gain W emb) (its checkpoints), not ADN
                 attention_axis='pixels'):  # 'channels': the layout of checkpoints from before the fix (UNet)
        super().__init__()
        self.edm2, self.attention_axis = edm2, attention_axis
        self.out_channels = out_channels
        self.flavor, self.resample_mode = flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                                             # pixel norm
        y = self.conv_res0(mp_silu(x))
        with torch.autocast(x.device.type, enabled=False):                     # the modulation in fp32 (EDM2)
            scale = self.emb_linear(emb, gain=self.emb_gain) + 1
            scale = (scale if self.edm2 else pnorm(scale))[:, :, None, None]   # ADN: pnorm(s(t)), [B, C]
        if self.edm2:                                                           # EDM2: y * (1 + gain W emb)
            y = mp_silu(mul(y, scale.to(y.dtype)))
        else:                                                                   # ADN: norm(x) * pnorm(s(t))
            y = mp_silu(mul(normalize(y, dim=1), scale.to(y.dtype)))
        y = dropout(y, self.dropout, self.training)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            B, C, H, W = x.shape
            y = normalize(self.attn_qkv(x).reshape(B, self.num_heads, -1, 3, H * W), dim=2)   # EDM2's layout,
            if self.attention_axis == 'pixels':                                 # pixel norm; q, k, v [B, heads, HW, c]
                q, k, v = (a.transpose(-1, -2) for a in y.unbind(3))
            else:                                                               # the old layout: [B, heads, c, HW]
                q, k, v = y.transpose(-1, -2).unbind(-1)
            y = attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2 U-Net (EDM2 Fig. 21) as sCM uses it for ImageNet 64 and 512 (App. G.1): positional embedding of
    c_noise(t) = t, ADN, dropout only at resolutions <= dropout_res, class labels, and for guided sCD an
    embedding of the CFG scale s added to the time embedding with a zero-initialized gain, so that a student with
    it starts as exactly the teacher without it (the paper: 'added like the label', App. G)."""

    def __init__(self, img_resolution, img_channels,
                 label_dim=0,               # number of classes; 0 = unconditional
                 model_channels=192,        # base channel count (Tables 4-5: 192/256/320/384/448)
                 channel_mult=(1, 2, 3, 4),  # EDM2
                 num_blocks=3,              # residual blocks per resolution, EDM2
                 attn_resolutions=(16, 8),  # EDM2
                 channels_per_head=64,      # EDM2
                 dropout=0.0,               # training setting, Tables 4-5 per size and method
                 dropout_res=16,            # dropout only at resolutions <= 16 (sCM App. G.2, after iCT)
                 cfg_embed=False,           # input for the CFG scale s (guided sCD, ImageNet 512)
                 label_balance=0.5, concat_balance=0.5,
                 edm2=False,                # EDM2's own network, as its checkpoints hold it (edm_pickle.py)
                 attention_axis='pixels'):  # 'channels': checkpoints from before the fix attended across channels
        super().__init__()
        self.edm2 = edm2
        levels = len(channel_mult)
        if img_resolution % (1 << (levels - 1)):
            raise ValueError(f'img_resolution {img_resolution} must be divisible by 2^{levels - 1} '
                             f'for channel_mult of length {levels}')
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.label_balance, self.concat_balance = label_balance, concat_balance
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        if edm2:                            # EDM2: random Fourier features of c_noise = ln(sigma)/4 (MPFourier)
            self.emb_fourier = MPFourier(cnoise)
        else:
            self.emb_time = PositionalEmbedding(cnoise, unit_rms=True)          # c_noise(t) = t, §4.1
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(label_dim, cemb) if label_dim else None
        self.emb_cfg_pos = PositionalEmbedding(cnoise, unit_rms=True) if cfg_embed else None
        self.emb_cfg = MPConv(cnoise, cemb) if cfg_embed else None
        self.cfg_gain = nn.Parameter(torch.zeros([])) if cfg_embed else None
        self.out_gain = nn.Parameter(torch.zeros([]))

        def block(cin, cout, res, **kw):
            return Block(cin, cout, cemb, channels_per_head=channels_per_head,
                         dropout=dropout if res <= dropout_res else 0.0, edm2=edm2,
                         attention_axis=attention_axis, **kw)

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(cout, channels, (3, 3))
                cout = channels
            else:
                self.enc[f'{res}x{res}_down'] = block(cout, cout, res, flavor='enc', resample_mode='down')
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = block(cout, channels, res, flavor='enc',
                                                          attention=res in attn_resolutions)
                cout = channels
        self.dec = nn.ModuleDict()
        skips = [cblock[0]] + [b.out_channels for b in list(self.enc.values())[1:]]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f'{res}x{res}_in0'] = block(cout, cout, res, flavor='dec', attention=True)
                self.dec[f'{res}x{res}_in1'] = block(cout, cout, res, flavor='dec')
            else:
                self.dec[f'{res}x{res}_up'] = block(cout, cout, res, flavor='dec', resample_mode='up')
            for i in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{i}'] = block(cout + skips.pop(), channels, res, flavor='dec',
                                                          attention=res in attn_resolutions)
                cout = channels
        self.out_conv = MPConv(cout, img_channels, (3, 3))

    def forward(self, u, t, labels=None, s=None):
        with torch.autocast(u.device.type, enabled=False):                     # the embedding path in fp32 (EDM2)
            t = t.to(_wide(t.dtype))
            if self.edm2:                      # EDM2: c_noise = ln(sigma)/4, sigma = sigma_d tan t, sigma_d = 0.5
                c = ((0.5 * t.double().tan()).log() / 4).to(_wide(self.emb_noise.weight.dtype))   # in fp64
                emb = self.emb_noise(self.emb_fourier(c))
            else:
                emb = self.emb_noise(self.emb_time(t))                         # c_noise(t) = t, §4.1
            if self.emb_label is not None:
                labels = torch.full_like(t, -1, dtype=torch.long) if labels is None else labels
                y = one_hot(labels, self.label_dim).to(emb.dtype) * math.sqrt(self.label_dim)
                emb = mp_sum(emb, self.emb_label(y), t=self.label_balance)
            if self.emb_cfg is not None:
                s = torch.ones_like(t) if s is None else s.to(t.dtype)
                emb = emb + self.emb_cfg(self.emb_cfg_pos(s), gain=self.cfg_gain)
            emb = mp_silu(emb)
        x = torch.cat([u, torch.ones_like(u[:, :1])], dim=1)
        skips = []
        for name, blk in self.enc.items():
            x = blk(x) if name.endswith('_conv') else blk(x, emb)
            skips.append(x)
        for name, blk in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = blk(x, emb)
        F = self.out_conv(x, gain=self.out_gain)
        return -F if self.edm2 else F                                           # EDM2's F_edm -> TrigFlow F


# ---------------------------------------------------------------------------------------------------------------
# DDPM++ (Song et al. 2021, as EDM's `SongUNet` in its CIFAR-10 configuration) with sCM's time conditioning: the
# paper's CIFAR-10 network (App. G.1). Layout, widths, GroupNorm, skip scaling and initialization follow EDM; the
# changes are c_noise(t) = t into the positional embedding, and ADN in place of DDPM++'s additive conditioning
# silu(GN(x + W emb)): silu(GN(x) * pnorm(1 + scale) + pnorm(shift)), which adds one emb -> C map per block.


class Conv2d(nn.Conv2d):
    """nn.Conv2d through affine() ('same' padding at stride 1, patches at stride = kernel): the bias in the layer's
    dtype, and the tangent under no_grad."""

    def forward(self, x):
        return affine(x, self.weight, self.bias, stride=self.stride[0])


def _init(layer, gain=1.0):
    """EDM's DDPM++ initialization: xavier-uniform weights times `gain` (1e-5 for the layers EDM zero-inits,
    sqrt(0.2) for attention's qkv), zero biases."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _gn(channels):
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)       # EDM's GroupNorm: >= 4 channels per group


class DDPMppBlock(nn.Module):
    """EDM's `UNetBlock` as DDPM++ configures it (one attention head, skip scale sqrt(1/2), 1x1 projection on
    resampled skips), with ADN as its modulation, or EDM's own additive one (additive=True: its checkpoints)."""

    def __init__(self, in_channels, out_channels, emb_channels, resample_mode='keep', attention=False, dropout=0.0,
                 additive=False):
        super().__init__()
        self.out_channels, self.resample_mode, self.attention, self.dropout = (out_channels, resample_mode,
                                                                              attention, dropout)
        self.additive = additive
        self.norm0 = _gn(in_channels)
        self.conv0 = _init(Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _init(Linear(emb_channels, (1 if additive else 2) * out_channels))   # EDM: a shift; ADN: both
        self.norm1 = _gn(out_channels)
        self.conv1 = _init(Conv2d(out_channels, out_channels, 3, padding=1), gain=1e-5)
        self.skip = None
        if in_channels != out_channels or resample_mode != 'keep':
            self.skip = _init(Conv2d(in_channels, out_channels, 1))
        if attention:
            self.norm2 = _gn(out_channels)
            self.qkv = _init(Conv2d(out_channels, 3 * out_channels, 1), gain=math.sqrt(0.2))
            self.proj = _init(Conv2d(out_channels, out_channels, 1), gain=1e-5)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(resample(silu(group_norm(x, self.norm0)), self.resample_mode))
        if self.additive:                                                       # EDM: silu(GN(x + W emb))
            x = silu(group_norm(x + self.affine(emb)[:, :, None, None].to(x.dtype), self.norm1))
        else:
            with torch.autocast(x.device.type, enabled=False):                 # the modulation in fp32 (EDM2)
                scale, shift = self.affine(emb).chunk(2, dim=1)
                scale, shift = pnorm(1 + scale)[:, :, None, None], pnorm(shift)[:, :, None, None]
            x = silu(mul(group_norm(x, self.norm1), scale.to(x.dtype)) + shift.to(x.dtype))   # ADN (§4.1)
        x = self.conv1(dropout(x, self.dropout, self.training))
        skip = orig if self.skip is None else self.skip(resample(orig, self.resample_mode))
        x = mul_scalar(x + skip, math.sqrt(0.5))
        if self.attention:
            B, C, H, W = x.shape
            q, k, v = self.qkv(group_norm(x, self.norm2)).reshape(B, 1, C, 3, H * W).transpose(2, 4).unbind(-2)
            y = attention(q, k, v)                                              # [B, 1, HW, C]: one head
            x = mul_scalar(self.proj(y.transpose(-1, -2).reshape(B, C, H, W)) + x, math.sqrt(0.5))
        return x


class DDPMpp(nn.Module):
    """DDPM++ as EDM's SongUNet CIFAR-10 configuration (`--arch=ddpmpp`: 128 x [2, 2, 2] channels, 4 blocks per
    resolution, attention at 16x16, embedding 4 x 128) returning F(u, t, labels). sCM's CIFAR-10 teacher and students
    (App. G.1). EDM's count without the augmentation input is 55,732,739 parameters; ADN's shift maps make ~60.1M.
    edm=True: EDM's own network, as its released checkpoints hold it (edm_pickle.py): additive conditioning, the
    embedding of c_noise = ln(sigma)/4 (sigma = sigma_d tan t) with sine and cosine swapped as SongUNet does, and
    F = -F_edm, the TrigFlow network of EDM's preconditioning (App. B.2; trigflow.F_from_edm_network)."""

    def __init__(self, img_resolution=32, img_channels=3, label_dim=0, model_channels=128, channel_mult=(2, 2, 2),
                 channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.0, cfg_embed=False, edm=False):
        super().__init__()
        self.edm = edm
        if cfg_embed:
            raise ValueError('DDPM++ has no input for the CFG scale (guided sCD): use the U-Net or the DiT')
        levels = len(channel_mult)
        if img_resolution % (1 << (levels - 1)):
            raise ValueError(f'img_resolution {img_resolution} must be divisible by 2^{levels - 1} '
                             f'for channel_mult of length {levels}')
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        cemb = model_channels * channel_mult_emb
        self.emb_time = PositionalEmbedding(model_channels, endpoint=True)     # c_noise(t) = t, §4.1
        self.emb_label = _init(Linear(label_dim, model_channels)) if label_dim else None
        self.map0 = _init(Linear(model_channels, cemb))
        self.map1 = _init(Linear(cemb, cemb))

        def block(cin, cout, **kw):
            return DDPMppBlock(cin, cout, cemb, dropout=dropout, additive=edm, **kw)

        self.enc = nn.ModuleDict()
        cout = model_channels
        self.enc[f'{img_resolution}x{img_resolution}_conv'] = _init(Conv2d(img_channels, cout, 3, padding=1))
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc[f'{res}x{res}_down'] = block(cout, cout, resample_mode='down')
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = block(cout, model_channels * mult, attention=res in attn_resolutions)
                cout = model_channels * mult
        skips = [b.out_channels for b in self.enc.values() if isinstance(b, DDPMppBlock)]
        skips.insert(0, model_channels)
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f'{res}x{res}_in0'] = block(cout, cout, attention=True)
                self.dec[f'{res}x{res}_in1'] = block(cout, cout)
            else:
                self.dec[f'{res}x{res}_up'] = block(cout, cout, resample_mode='up')
            for i in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{i}'] = block(cout + skips.pop(), model_channels * mult,
                                                          attention=i == num_blocks and res in attn_resolutions)
                cout = model_channels * mult
        self.out_norm = _gn(cout)
        self.out_conv = _init(Conv2d(cout, img_channels, 3, padding=1), gain=1e-5)

    def forward(self, u, t, labels=None, s=None):
        with torch.autocast(u.device.type, enabled=False):                     # the embedding path in fp32 (EDM2)
            t = t.to(_wide(t.dtype))
            if self.edm:                       # EDM: c_noise = ln(sigma)/4, sigma = sigma_d tan t, sigma_d = 0.5,
                c = ((0.5 * t.double().tan()).log() / 4).to(_wide(self.map0.weight.dtype))   # in fp64 (t near pi/2)
                emb = self.emb_time(c)
                emb = emb.unflatten(1, (2, -1)).flip(1).flatten(1)              # [sin, cos], as SongUNet swaps them
            else:
                emb = self.emb_time(t)                                          # c_noise(t) = t, §4.1
            if self.emb_label is not None:
                labels = torch.full_like(t, -1, dtype=torch.long) if labels is None else labels
                emb = emb + self.emb_label(one_hot(labels, self.label_dim).to(emb.dtype) * math.sqrt(self.label_dim))
            emb = silu(self.map1(silu(self.map0(emb))))
        x, skips = u, []
        for name, blk in self.enc.items():
            x = blk(x) if name.endswith('_conv') else blk(x, emb)
            skips.append(x)
        for name, blk in self.dec.items():
            if '_block' in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        F = self.out_conv(silu(group_norm(x, self.out_norm)))
        return -F if self.edm else F                                            # EDM's F_edm -> TrigFlow F


# ---------------------------------------------------------------------------------------------------------------
# DiT (Peebles & Xie 2023) with sCM's time conditioning: positional embedding of raw t, ADN in adaLN.


def _pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding, [grid*grid, dim] (DiT / MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing='ij')
    parts = [f(c.reshape(-1, 1) * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def adn(x, shift, scale):
    """Adaptive double normalization (sCM §4.1) on a LayerNorm-ed x: x * pnorm(1 + scale) + pnorm(shift), where
    DiT's adaLN has x * (1 + scale) + shift."""
    return mul(x, pnorm(1 + scale).unsqueeze(1)) + pnorm(shift).unsqueeze(1)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero gates; the scale and shift go through ADN."""

    def __init__(self, hidden, heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden)
        self.proj = Linear(hidden, hidden)
        self.fc1 = Linear(hidden, int(hidden * mlp_ratio))
        self.fc2 = Linear(int(hidden * mlp_ratio), hidden)
        self.dropout = dropout
        self.modulation = Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.modulation.weight)                                  # adaLN-Zero: the block starts as identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x, c):
        B, L, C = x.shape
        with torch.autocast(x.device.type, enabled=False):                     # the modulation in fp32 (EDM2)
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(silu(c)).chunk(6, dim=1)
        h = self.qkv(adn(layer_norm(x), shift1, scale1)).reshape(B, L, 3, self.heads, C // self.heads)
        q, k, v = h.permute(2, 0, 3, 1, 4).unbind(0)                           # each [B, heads, L, C/heads]
        h = attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        x = x + mul(gate1.unsqueeze(1), self.proj(h))
        h = gelu(self.fc1(adn(layer_norm(x), shift2, scale2)))
        h = dropout(h, self.dropout, self.training)
        return x + mul(gate2.unsqueeze(1), self.fc2(h))


class DiT(nn.Module):
    """Diffusion Transformer backbone returning F(u, t, labels, s). Sizes in DIT_PRESETS (DiT Table 1)."""

    def __init__(self, input_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, label_dim=1000, cfg_embed=False, dropout=0.0, time_channels=256):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f'input_size {input_size} must be divisible by patch_size {patch_size}')
        self.img_resolution, self.img_channels, self.label_dim = input_size, in_channels, label_dim
        self.p, self.grid = patch_size, input_size // patch_size
        self.patch = Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer('pos', _pos_embed_2d(hidden_size, self.grid), persistent=False)
        self.emb_time = PositionalEmbedding(time_channels)                    # c_noise(t) = t, §4.1
        self.time_mlp = nn.Sequential(Linear(time_channels, hidden_size), SiLU(),
                                      Linear(hidden_size, hidden_size))
        self.emb_label = nn.Embedding(label_dim + 1, hidden_size) if label_dim else None  # row label_dim = null
        self.emb_cfg_pos = PositionalEmbedding(time_channels) if cfg_embed else None
        self.emb_cfg = Linear(time_channels, hidden_size) if cfg_embed else None
        if cfg_embed:                                                           # starts as the teacher
            nn.init.zeros_(self.emb_cfg.weight)
            nn.init.zeros_(self.emb_cfg.bias)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.modulation_out = Linear(hidden_size, 2 * hidden_size)
        self.out = Linear(hidden_size, patch_size * patch_size * in_channels)
        for layer in (self.modulation_out, self.out):                           # DiT's zero init: F = 0 at start
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, u, t, labels=None, s=None):
        B, C, H, W = u.shape
        x = self.patch(u).flatten(2).transpose(1, 2) + self.pos.to(u.dtype)    # [B, L, hidden]
        with torch.autocast(u.device.type, enabled=False):                     # the embedding path in fp32 (EDM2)
            t = t.to(_wide(t.dtype))
            c = self.time_mlp(self.emb_time(t))
            if self.emb_label is not None:
                labels = torch.full_like(t, -1, dtype=torch.long) if labels is None else labels
                c = c + self.emb_label(torch.where(labels < 0, self.label_dim, labels)).to(c.dtype)
            if self.emb_cfg is not None:
                c = c + self.emb_cfg(self.emb_cfg_pos(torch.ones_like(t) if s is None else s.to(t.dtype)))
        for blk in self.blocks:
            x = blk(x, c)
        with torch.autocast(u.device.type, enabled=False):
            shift, scale = self.modulation_out(silu(c)).chunk(2, dim=1)
        x = self.out(adn(layer_norm(x), shift, scale))                       # [B, L, p*p*C]
        x = x.reshape(B, self.grid, self.grid, self.p, self.p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)


# ---------------------------------------------------------------------------------------------------------------
# A small MLP for low-dimensional data (tests, the offline demo).


class MLP(nn.Module):
    """F(u, t) for vectors u [B, dim]: residual MLP blocks with the same time conditioning as the image nets
    (positional embedding of t, ADN)."""

    def __init__(self, dim=2, hidden=256, depth=4, label_dim=0, time_channels=64, max_positions=100, dropout=0.0):
        super().__init__()
        self.dim, self.label_dim, self.dropout = dim, label_dim, dropout
        self.emb_time = PositionalEmbedding(time_channels, max_positions)
        self.time_mlp = nn.Sequential(Linear(time_channels, hidden), SiLU(), Linear(hidden, hidden))
        self.emb_label = nn.Embedding(label_dim + 1, hidden) if label_dim else None
        self.inp = Linear(dim, hidden)
        self.mods = nn.ModuleList(Linear(hidden, 2 * hidden) for _ in range(depth))
        self.fc1 = nn.ModuleList(Linear(hidden, hidden) for _ in range(depth))
        self.fc2 = nn.ModuleList(Linear(hidden, hidden) for _ in range(depth))
        self.out = Linear(hidden, dim)

    def forward(self, u, t, labels=None, s=None):
        c = self.time_mlp(self.emb_time(t))
        if self.emb_label is not None:
            labels = torch.full_like(t, -1, dtype=torch.long) if labels is None else labels
            c = c + self.emb_label(torch.where(labels < 0, self.label_dim, labels))
        h = self.inp(u)
        for mod, fc1, fc2 in zip(self.mods, self.fc1, self.fc2):
            shift, scale = mod(silu(c)).chunk(2, dim=1)
            y = mul(pnorm(h), pnorm(1 + scale)) + pnorm(shift)                   # ADN (§4.1)
            y = dropout(silu(fc1(y)), self.dropout, self.training)
            h = h + fc2(y)
        return self.out(silu(pnorm(h)))


# ---------------------------------------------------------------------------------------------------------------
# Presets. ImageNet presets use EDM2's layout; parameter counts are checked against sCM Tables 4-5 in the tests.

UNET_PRESETS = {
    # ImageNet 512x512 in SD-VAE latents (64x64x4), class-conditional: sCM Table 5 (280.2/497.8/777.6/1119.4/1523.4 M)
    's':        dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=192),
    'm':        dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=256),
    'l':        dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=320),
    'xl':       dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=384),
    'xxl':      dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=448),
    # ImageNet 64x64 pixels, class-conditional: sCM Table 4 (280.2/497.8/777.6/1119.4 M)
    'img64-s':  dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192),
    'img64-m':  dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=256),
    'img64-l':  dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=320),
    'img64-xl': dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=384),
    # Small CPU presets: 28x28 grayscale (MNIST, Fashion-MNIST), 32x32 RGB (CIFAR-10) and a tiny net for the tests.
    'fashion':  dict(img_resolution=28, img_channels=1, label_dim=10, model_channels=32, channel_mult=(1, 2, 2),
                     num_blocks=2, attn_resolutions=(7,), channels_per_head=32, dropout_res=28),
    'fashion-s': dict(img_resolution=28, img_channels=1, label_dim=10, model_channels=16, channel_mult=(1, 2, 2),
                     num_blocks=1, attn_resolutions=(7,), channels_per_head=32, dropout_res=28),
    'cifar10-s': dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=16, channel_mult=(1, 2, 2),
                      num_blocks=1, attn_resolutions=(8,), channels_per_head=32, dropout_res=32),   # CPU, RGB
    'tiny':     dict(img_resolution=16, img_channels=1, label_dim=0, model_channels=8, channel_mult=(1, 2),
                     num_blocks=1, attn_resolutions=(8,), channels_per_head=8, dropout_res=16),
}

DDPMPP_PRESETS = {  # CIFAR-10, unconditional: the paper's DDPM++ (App. G.1) = EDM's `--arch=ddpmpp`, 60.1M with ADN
    'cifar10': dict(img_resolution=32, img_channels=3, label_dim=0, model_channels=128, channel_mult=(2, 2, 2),
                    num_blocks=4, attn_resolutions=(16,)),
    # EDM's released DDPM++ as it is (edm_pickle.py): edm-cifar10-32x32-{uncond,cond}-vp.pkl; a tiny one for tests
    'edm-cifar10': dict(img_resolution=32, img_channels=3, label_dim=0, model_channels=128, channel_mult=(2, 2, 2),
                        channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), edm=True),
    'edm-cifar10-cond': dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=128,
                             channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), edm=True),
    'edm-tiny': dict(img_resolution=16, img_channels=1, label_dim=0, model_channels=8, channel_mult=(1, 2),
                     channel_mult_emb=4, num_blocks=1, attn_resolutions=(8,), edm=True),
}

DIT_PRESETS = {  # DiT Table 1; sCM itself uses the U-Net, the DiT is offered as an alternative backbone.
    'DiT-S':  dict(depth=12, hidden_size=384, num_heads=6),
    'DiT-B':  dict(depth=12, hidden_size=768, num_heads=12),
    'DiT-L':  dict(depth=24, hidden_size=1024, num_heads=16),
    'DiT-XL': dict(depth=28, hidden_size=1152, num_heads=16),
    'DiT-tiny': dict(depth=2, hidden_size=32, num_heads=2),
}


def project_weights_(net):
    """EDM2's forced weight normalization (EDM2 Eq. 66) for every MPConv in net; call after each optimizer step."""
    for m in net.modules():
        if isinstance(m, MPConv):
            m.project_()


def build(kwargs):
    """A network from the keyword arguments a checkpoint stores ('arch': 'unet', 'ddpmpp' or 'dit', then the
    constructor's)."""
    return dict(unet=UNet, ddpmpp=DDPMpp, dit=DiT)[kwargs['arch']](**_with_defaults(kwargs))


def _with_defaults(kwargs):
    """A checkpoint's U-Net from before the attention fix (no 'attention_axis') attended across channels instead of pixels
    (a bug, fixed then): it keeps that layout, so that it samples as it was trained."""
    kw = {k: v for k, v in kwargs.items() if k != 'arch'}
    if kwargs['arch'] == 'unet':
        kw.setdefault('attention_axis', 'channels')
    return kw


def architecture(kwargs):
    """The keyword arguments that decide the weights' shapes (not dropout, not the CFG input)."""
    return {k: v for k, v in dict(_with_defaults(kwargs), arch=kwargs['arch']).items()
            if k not in ('dropout', 'dropout_res', 'cfg_embed')}
