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

import torch

import model
import safe_pickle
from cli import UserError


class Persistent(safe_pickle.ModuleRecord):
    """A persistence object as data: its class name, its module source (kept as text, never run), and its __dict__."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('state'), dict):
            raise safe_pickle.ReadError('a persistent object without the class record EDM and EDM2 write')
        self.class_name = meta.get('class_name')
        self.module_src = meta.get('module_src', '')                      # kept as text, for the record only
        self.state = dict(meta['state'])

    @property
    def init_kwargs(self):
        kw = self.state.get('_init_kwargs') or {}
        if not isinstance(kw, dict):
            raise UserError(f'{self.class_name}: its _init_kwargs are a {type(kw).__name__}, not a dict')
        return dict(kw)


# (module, name) -> what it builds. Nothing here runs code from the file: each builds a record, a container or a
# tensor, with safe_pickle's checks (dense tensors, plain numeric numpy arrays).
_NN = 'torch.nn.modules.'
SAFE = {
    **safe_pickle.TORCH, **safe_pickle.NUMPY,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): Persistent,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('dnnlib.util', 'EasyDict'): dict,
    ('torch.storage', '_load_from_bytes'): safe_pickle.legacy_storage,
    **{(_NN + mod, name): safe_pickle.module_record(name) for mod, name in [
        ('container', 'ModuleDict'), ('container', 'ModuleList'), ('container', 'Sequential'),
        ('activation', 'SiLU'), ('dropout', 'Dropout'), ('linear', 'Identity')]},
}


def load(path):
    """The pickle at `path` as plain data: dicts, tensors, and Persistent records for its network objects."""
    try:
        return safe_pickle.read_pickle_file(path, 'an EDM/EDM2 network pickle', SAFE, persistent=_torch_save)
    except safe_pickle.ReadError as e:
        raise UserError(str(e)) from None


def convert_file(path):
    """(model_kwargs, state_dict) of the network in an EDM/EDM2 pickle file (its 'ema', as their snapshots hold)."""
    data = load(path)
    return convert(data.get('ema') if isinstance(data, dict) else data, path)


def _torch_save(pid):
    raise safe_pickle.ReadError('a torch.save file, not a pickle: load it with torch.load(weights_only=True)')


def _table(obj, key, of):
    """obj.state[key] as a dict of `of` values (None allowed), or one line saying what it is instead."""
    table = obj.state.get(key) or {}
    if not isinstance(table, dict) or not all(isinstance(v, of) or v is None for v in table.values()):
        raise UserError(f'{obj.class_name}: its {key} is not a table of {of.__name__}s')
    return table


def children(obj):
    """The submodules of a Persistent or TorchModule record, by name."""
    return dict(_table(obj, '_modules', safe_pickle.ModuleRecord))


def state_dict(obj, prefix=''):
    """{dotted name: tensor} of every parameter and persistent buffer below obj, as nn.Module.state_dict names them
    (safe_pickle.check_tree made the modules a tree of bounded depth, so this walk ends)."""
    out = {}
    skip = set(obj.state.get('_non_persistent_buffers_set') or ())
    for kind in ('_parameters', '_buffers'):
        for k, v in _table(obj, kind, torch.Tensor).items():
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
    DDPM++ -> model.DDPMpp(edm=True); EDM2's Precond -> model.UNet(edm2=True). A pickle of another form (a keyword
    missing or of another type) gets one line."""
    try:
        return (convert_edm2 if isinstance(obj, Persistent) and obj.class_name == 'Precond' else convert_edm)(obj, path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f'{path}: its network\'s constructor arguments are not of the form EDM/EDM2 write '
                        f'({type(e).__name__}: {str(e)[:120]})') from None


def convert_edm(obj, path):
    if not isinstance(obj, Persistent) or obj.class_name != 'EDMPrecond':
        raise UserError(f'{path}: its network is {getattr(obj, "class_name", type(obj).__name__)}, not EDMPrecond or '
                        f'Precond; this converts EDM\'s DDPM++ (the -vp checkpoints) and EDM2\'s U-Nets')
    pre = obj.init_kwargs
    unet = children(obj).get('model')
    kw = dict(SONGUNET_DEFAULTS, **getattr(unet, 'init_kwargs', {}))
    if pre.get('model_type', 'DhariwalUNet') != 'SongUNet':
        raise UserError(f'{path}: its network is {pre.get("model_type", "DhariwalUNet")}; this converts EDM\'s '
                        'DDPM++ (SongUNet, positional; the -vp checkpoints), not ADM (DhariwalUNet)')
    if any(list(kw[k]) != v if isinstance(v, list) else kw[k] != v for k, v in DDPMPP.items()):
        raise UserError(f'{path}: its network is SongUNet with ' + ', '.join(f'{k}={kw.get(k)}' for k in DDPMPP) +
                        '; this converts EDM\'s DDPM++ (positional; the -vp checkpoints), not NCSN++ (-ve)')
    if pre.get('sigma_data', 0.5) != 0.5:
        raise UserError(f'{path}: sigma_data {pre.get("sigma_data")}; TrigFlow here needs 0.5')
    if kw['in_channels'] != kw['out_channels']:
        raise UserError(f'{path}: in_channels {kw["in_channels"]} and out_channels {kw["out_channels"]} differ')
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
