"""EDM and EDM2 network pickles (`edm-cifar10-32x32-uncond-vp.pkl`, `edm2-img512-xs-...pkl`), read without running
anything they carry.

Their networks are `torch_utils.persistence` objects: unpickling one the usual way `exec`s the module source stored
in the file. Their state -- parameters, buffers, submodules, constructor arguments -- is plain data beside that source.
`load` unpickles with every global refused but a short list that builds data only (tensors from bytes, dicts, numpy
arrays), and turns each persistent object into a `Persistent` record (its class name and state) instead of running
its module. Nothing of the file is executed; a pickle that names anything else gets one `error:` line.

  obj = edm_pickle.load('edm-cifar10-32x32-uncond-vp.pkl')['ema']     # Persistent('EDMPrecond', ...)
  obj.class_name, obj.init_kwargs, edm_pickle.state_dict(obj)          # 'EDMPrecond', {...}, {'model.map_layer0...': T}
  model_kwargs, state = edm_pickle.convert(obj, path)                  # model.build(model_kwargs).load_state_dict(state)

EDM's DDPM++ (SongUNet with positional embedding: the `-vp` checkpoints) becomes `model.DDPMpp(edm=True)`, EDM's
network as it is, returning TrigFlow's F (App. B.2).
"""
import collections
import io
import pickle

import numpy as np
import torch

import model
from cli import UserError


class Persistent:
    """A persistence object as data: its class name, the sha of its module source (never run), and its __dict__."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class' or 'state' not in meta:
            raise UserError('a persistent object without the class record EDM and EDM2 write')
        self.class_name = meta.get('class_name')
        self.module_src = meta.get('module_src', '')                      # kept as text, for the record only
        self.state = dict(meta['state'])

    @property
    def init_kwargs(self):
        return dict(self.state.get('_init_kwargs') or {})

    def __repr__(self):
        return f'Persistent({self.class_name!r})'


class TorchModule:
    """A stock torch.nn container (ModuleDict, ModuleList, Sequential, ...) as data: its __dict__ after BUILD."""

    def __init__(self, *args):
        self.class_name, self.state = type(self).__name__, {}

    def __setstate__(self, state):
        self.state = dict(state)


def _module_stub(name):
    return type(name, (TorchModule,), {})


def _storage_from_bytes(b):
    """torch.storage._load_from_bytes, but through the weights-only loader: a storage pickled by pickle.dump."""
    return torch.load(io.BytesIO(b), weights_only=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return data                                                            # the tensor; hooks and state dropped


_np_multiarray = (getattr(np, '_core', None) or np.core).multiarray    # numpy 2 renamed numpy.core to numpy._core

# (module, name) -> what it builds. Nothing here runs code from the file: each builds a container or a tensor.
_NN = 'torch.nn.modules.'
SAFE = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): Persistent,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('dnnlib.util', 'EasyDict'): dict,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
    ('torch', 'Size'): torch.Size,
    ('numpy.core.multiarray', '_reconstruct'): _np_multiarray._reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _np_multiarray._reconstruct,
    ('numpy.core.multiarray', 'scalar'): _np_multiarray.scalar,
    ('numpy._core.multiarray', 'scalar'): _np_multiarray.scalar,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    **{(_NN + mod, name): _module_stub(name) for mod, name in [
        ('container', 'ModuleDict'), ('container', 'ModuleList'), ('container', 'Sequential'),
        ('activation', 'SiLU'), ('dropout', 'Dropout'), ('linear', 'Identity')]},
}
SAFE.update({('torch', name): getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name),
                                                                                       torch.dtype)})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE:
            raise UserError(f'{self.path}: it names {module}.{name}, which an EDM/EDM2 network pickle does not need; '
                            f'refused, nothing of it ran')
        return SAFE[(module, name)]

    def persistent_load(self, pid):
        raise UserError(f'{self.path}: a torch.save file, not a pickle: load it with torch.load(weights_only=True)')


def load(path):
    """The pickle at `path` as plain data: dicts, tensors, and Persistent records for its network objects."""
    try:
        with open(path, 'rb') as f:
            up = _Unpickler(f)
            up.path = path
            return up.load()
    except UserError:
        raise
    except OSError as e:
        raise UserError(f'{path}: {e.strerror or e}') from None
    except Exception as e:                                                 # truncated, not a pickle, ...
        raise UserError(f'{path}: not a readable pickle ({type(e).__name__}: {e})') from None


def children(obj):
    """The submodules of a Persistent or TorchModule record, by name."""
    return dict(obj.state.get('_modules') or {})


def state_dict(obj, prefix=''):
    """{dotted name: tensor} of every parameter and persistent buffer below obj, as nn.Module.state_dict names them."""
    out = {}
    skip = set(obj.state.get('_non_persistent_buffers_set') or ())
    for kind in ('_parameters', '_buffers'):
        for k, v in (obj.state.get(kind) or {}).items():
            if v is not None and k not in skip:
                out[prefix + k] = v
    for k, child in children(obj).items():
        if child is not None:
            out.update(state_dict(child, prefix + k + '.'))
    return out


# SongUNet's constructor defaults (EDM, training/networks.py): a pickle records only the arguments passed explicitly.
SONGUNET_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                         num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                         channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
DDPMPP = dict(embedding_type='positional', channel_mult_noise=1, encoder_type='standard', decoder_type='standard',
              resample_filter=[1, 1])                                     # EDM's --arch=ddpmpp (train.py)


def convert(obj, path='the pickle'):
    """(model_kwargs, state_dict) of this project's network holding an EDM or EDM2 pickle's: EDM's EDMPrecond with
    DDPM++ -> model.DDPMpp(edm=True); EDM2's Precond -> model.UNet(edm2=True)."""
    if isinstance(obj, Persistent) and obj.class_name == 'Precond':
        return convert_edm2(obj, path)
    if not isinstance(obj, Persistent) or obj.class_name != 'EDMPrecond':
        raise UserError(f'{path}: its network is {getattr(obj, "class_name", type(obj).__name__)}, not EDMPrecond or '
                        f'Precond; this converts EDM\'s DDPM++ (the -vp checkpoints) and EDM2\'s U-Nets')
    pre = obj.init_kwargs
    unet = children(obj).get('model')
    kw = dict(SONGUNET_DEFAULTS, **getattr(unet, 'init_kwargs', {}))
    if pre.get('model_type', 'DhariwalUNet') != 'SongUNet' or any(
            list(kw[k]) != v if isinstance(v, list) else kw[k] != v for k, v in DDPMPP.items()):
        raise UserError(f'{path}: its network is {pre.get("model_type", "DhariwalUNet")} ' + ', '.join(
            f'{k}={kw.get(k)}' for k in DDPMPP) + '; this converts EDM\'s DDPM++ (SongUNet, positional; the -vp '
            'checkpoints), not ADM (DhariwalUNet) or NCSN++ (-ve)')
    if pre.get('sigma_data', 0.5) != 0.5 or kw['in_channels'] != kw['out_channels']:
        raise UserError(f'{path}: sigma_data {pre.get("sigma_data", 0.5)} (0.5 needed) or in/out channels differ')
    model_kwargs = dict(arch='ddpmpp', edm=True, img_resolution=kw['img_resolution'], img_channels=kw['in_channels'],
                        label_dim=kw['label_dim'], model_channels=kw['model_channels'],
                        channel_mult=tuple(kw['channel_mult']), channel_mult_emb=kw['channel_mult_emb'],
                        num_blocks=kw['num_blocks'], attn_resolutions=tuple(kw['attn_resolutions']),
                        dropout=float(kw['dropout']))
    res = kw['img_resolution']
    names = {'map_label.': 'emb_label.', 'map_layer0.': 'map0.', 'map_layer1.': 'map1.',
             f'dec.{res}x{res}_aux_norm.': 'out_norm.', f'dec.{res}x{res}_aux_conv.': 'out_conv.'}
    state = {}
    for k, v in state_dict(unet).items():
        if k.endswith('.resample_filter') or k.startswith('map_augment.'):   # a fixed [1, 1] filter; augmentation
            continue                                                        # labels, zero when sampling
        for old, new in names.items():
            if k.startswith(old):
                k = new + k[len(old):]
        state[k] = v
    state['emb_time.freqs'] = model.PositionalEmbedding(kw['model_channels'], endpoint=True).freqs   # ours, fixed
    return model_kwargs, state


# EDM2's UNet and Block defaults (EDM2, training/networks_edm2.py); channel_mult_noise/emb None: EDM2's own choice.
EDM2_DEFAULTS = dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None,
                     num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5,
                     channels_per_head=64, dropout=0, res_balance=0.3, attn_balance=0.3, clip_act=256,
                     resample_filter=[1, 1])


def convert_edm2(obj, path='the pickle'):
    """(model_kwargs, state_dict) of model.UNet(edm2=True) holding an EDM2 pickle's Precond (its U-Net; the
    uncertainty head logvar_*, used only by EDM2's loss, is dropped)."""
    pre = obj.init_kwargs
    unet = children(obj).get('unet')
    kw = dict(EDM2_DEFAULTS, **getattr(unet, 'init_kwargs', {}))
    fixed = dict(channel_mult_noise=None, channel_mult_emb=None, res_balance=0.3, attn_balance=0.3, clip_act=256,
                 resample_filter=[1, 1])                                   # what model.UNet does not take
    odd = [f'{k}={kw[k]}' for k, v in fixed.items() if (list(kw[k]) if isinstance(v, list) else kw[k]) != v]
    if odd or pre.get('sigma_data', 0.5) != 0.5:
        raise UserError(f'{path}: an EDM2 U-Net with {", ".join(odd) or "sigma_data " + str(pre.get("sigma_data"))}, '
                        f'which model.UNet does not take')
    model_kwargs = dict(arch='unet', edm2=True, img_resolution=kw['img_resolution'], img_channels=kw['img_channels'],
                        label_dim=kw['label_dim'], model_channels=kw['model_channels'],
                        channel_mult=tuple(kw['channel_mult']), num_blocks=kw['num_blocks'],
                        attn_resolutions=tuple(kw['attn_resolutions']), channels_per_head=kw['channels_per_head'],
                        label_balance=kw['label_balance'], concat_balance=kw['concat_balance'],
                        dropout=float(kw['dropout']), dropout_res=kw['img_resolution'],   # EDM2: in every block
                        attention_axis='pixels')
    state = {k: v for k, v in state_dict(unet).items() if not k.endswith('.resample_filter')}
    return model_kwargs, state
