"""Files a user hands us, read as data: foreign pickles (EDM/EDM2 networks, CIFAR-10 batches, the TorchScript FID
Inception's tensors) and this project's own checkpoints. Nothing in a file runs, crashes the process, hangs it, or
allocates much more than the file's own size; a corrupted file is refused; every refusal is one `ReadError` line.

Foreign pickles go through `Unpickler`, a pure-Python unpickler (the stdlib's reference implementation, as torch's
weights-only loader is one of its own) with these rules:
- a global is answered only from the caller's `allowed` table (data builders: tensors, containers, arrays);
- BUILD (the opcode that hands a file's state to an object's __setstate__) acts only on this module's `Record`s,
  whose `_build` checks the state and builds plain data itself (numpy's own __setstate__ never sees a file's state:
  a structured dtype with forged flags reads bytes as pointers);
- numpy: plain numeric dtypes only; arrays from raw bytes of exactly their size (no object arrays);
- tensors: dense views of storages that the file holds in full (no stride-0 or overlapping giants);
- the memo (pickle's back-reference table) is a dict with a bound on its index, the file is read from a memory map
  (a length field cannot make a read allocate more than the file holds);
- `check_tree` walks the result once: a module record reached twice (a DAG or a cycle) is refused, depth and tensor
  count are bounded, so that nothing downstream walks 2^64 paths or recurses without end.
Checkpoints (`torch_load`): the zip's CRC of every record first, then torch.load(weights_only=True), then the same
tree check.
"""
import _compat_pickle
import io
import mmap
import os
import pickle
import zipfile

import numpy as np
import torch

MAX_DEPTH = 64            # nesting of containers and records (EDM2's U-Net: ~12)
MAX_TENSORS = 100_000     # tensors in one file (EDM2 XXL: ~1.2k)
MAX_MEMO = 1 << 24        # pickle memo index (a real pickle uses one index per object it writes)


class ReadError(Exception):
    """One line naming the file and what is wrong with it (the scripts print it as an `error:` line)."""


class Record:
    """A foreign object as data. BUILD calls `_build(state)`, which checks the state and returns what stands for the
    object from then on (itself, or plain data built from the state)."""

    def _build(self, state):
        raise ReadError(f'BUILD on {type(self).__name__}')


class ModuleRecord(Record):
    """A module (a persistence object, a stock torch.nn container, a TorchScript module): its class and __dict__.
    check_tree refuses one reached twice."""
    default_name = ''

    def __new__(cls, *args, **kwargs):                # NEWOBJ calls __new__ alone: the record is whole after it
        self = super().__new__(cls)
        self.class_name, self.state = cls.default_name, {}
        return self

    def __init__(self, *args, **kwargs):
        pass

    def _build(self, state):
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:    # (None, slots)
            state = state[1]
        if not isinstance(state, dict):
            raise ReadError(f'{self.class_name}: a module state that is a {type(state).__name__}, not a dict')
        self.state.update(state)
        return self

    def __repr__(self):
        return f'{type(self).__name__}({self.class_name!r})'


def module_record(class_name):
    """A ModuleRecord subclass standing for the class `class_name`."""
    return type(class_name.rsplit('.', 1)[-1], (ModuleRecord,), {'default_name': class_name})


# ---- numpy: plain numeric dtypes and arrays of raw bytes ---------------------------------------------------------
NUMERIC = {'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16'}


class DType(Record):
    """numpy.dtype(name, align, copy) then BUILD (version, byteorder, None, None, None, -1, -1, 0[, None])."""

    def __init__(self, name, align=False, copy=True):
        name = name.decode('latin1') if isinstance(name, bytes) else name       # a Python 2 pickle read as bytes
        if not isinstance(name, str) or name not in NUMERIC:
            raise ReadError(f'numpy dtype {name!r}: only plain numeric dtypes are read')
        self.dtype = np.dtype(name)

    def _build(self, state):
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], bytes):
            state = (state[0], state[1].decode('latin1'), *state[2:])
        ok = isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4) and state[1] in '<>|=' and \
            state[2:5] == (None, None, None) and state[5:8] == (-1, -1, 0) and all(s is None for s in state[8:])
        if not ok:
            raise ReadError(f'numpy dtype state {str(state)[:80]}: not a plain numeric dtype\'s')
        return self.dtype.newbyteorder(state[1]) if state[1] in '<>' else self.dtype


def _np_dtype(d):
    d = d.dtype if isinstance(d, DType) else d
    if not isinstance(d, np.dtype) or d.kind not in 'biufc' or d.fields is not None or d.subdtype is not None:
        raise ReadError(f'numpy dtype {d!r}: only plain numeric dtypes are read')
    return d


class NDArray(Record):
    """numpy.core.multiarray._reconstruct(ndarray, shape, b'b') then BUILD (1, shape, dtype, fortran, raw bytes)."""

    def __init__(self, cls=None, shape=(0,), typecode=b'b'):
        if cls is not NDARRAY:
            raise ReadError('numpy _reconstruct of a class other than ndarray')

    def _build(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[1], tuple)
                and all(isinstance(n, int) and n >= 0 for n in state[1]) and isinstance(state[4], (bytes, bytearray))):
            raise ReadError(f'numpy array state {str(state)[:80]}: not a numeric array of raw bytes')
        dtype, shape = _np_dtype(state[2]), state[1]
        if int(np.prod(shape, dtype=object)) * dtype.itemsize != len(state[4]):
            raise ReadError(f'numpy array of shape {shape} {dtype}: {len(state[4])} bytes do not fill it')
        return np.frombuffer(state[4], dtype).reshape(shape, order='F' if state[3] else 'C').copy()


def np_scalar(dtype, raw):
    dtype = _np_dtype(dtype)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.itemsize:
        raise ReadError('a numpy scalar whose bytes do not fit its dtype')
    return np.frombuffer(raw, dtype)[0]


def codecs_encode(s, encoding='utf-8'):
    """_codecs.encode(str, 'latin1'): how protocol-2 pickles written by Python 3 store bytes."""
    if not isinstance(s, str) or encoding not in ('latin1', 'latin-1'):
        raise ReadError('_codecs.encode other than bytes stored as latin-1')
    return s.encode('latin1')


NDARRAY = object()        # what 'numpy.ndarray' names: an argument of _reconstruct, never called (it would allocate)
NUMPY = {
    ('numpy', 'dtype'): DType, ('numpy', 'ndarray'): NDARRAY, ('_codecs', 'encode'): codecs_encode,
    **{(m, '_reconstruct'): NDArray for m in ('numpy.core.multiarray', 'numpy._core.multiarray')},
    **{(m, 'scalar'): np_scalar for m in ('numpy.core.multiarray', 'numpy._core.multiarray')},
}


# ---- torch: storages and dense tensors --------------------------------------------------------------------------
STORAGE_DTYPES = {'DoubleStorage': torch.float64, 'FloatStorage': torch.float32, 'HalfStorage': torch.float16,
                  'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                  'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                  'BoolStorage': torch.bool}


class Storage:
    """A storage the file holds in full: a flat tensor of its elements."""

    def __init__(self, flat):
        self.flat = flat


def storage_from(raw, dtype, numel):
    """A Storage of `numel` elements of `dtype` from exactly that many bytes (copied, so writable)."""
    size = torch.empty((), dtype=dtype).element_size()
    if not isinstance(numel, int) or numel < 0 or numel * size != len(raw):
        raise ReadError(f'a storage of {numel} {dtype} elements held in {len(raw)} bytes')
    return Storage(torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype))


def _sizes(v):
    return isinstance(v, (tuple, list, torch.Size)) and all(isinstance(n, int) and n >= 0 for n in v)


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2, dense views only: every element at its own place inside the storage."""
    if not isinstance(storage, Storage) or not isinstance(offset, int) or not _sizes(size) or not _sizes(stride) \
            or len(size) != len(stride):
        raise ReadError('a tensor record that is not (storage, offset, size, stride)')
    check_dense(tuple(size), tuple(stride), offset, storage.flat.numel())
    return storage.flat.as_strided(tuple(size), tuple(stride), offset)


def check_dense(size, stride, offset, available):
    """No element shared by two indices (so numel <= what the storage holds): refuses stride-0 and overlapping views,
    which would let a few bytes stand for gigabytes."""
    numel = 1
    for n in size:
        numel *= n
    if numel == 0:
        return
    end, span = offset, 1
    for n, s in sorted(zip(size, stride), key=lambda p: p[1]):
        if n > 1 and s < span:
            raise ReadError(f'a tensor of shape {list(size)} whose elements overlap (strides {list(stride)})')
        span = s * n if n > 1 else span
        end += (n - 1) * s
    if end >= available:
        raise ReadError(f'a tensor of shape {list(size)} reaches past its storage of {available} elements')


def rebuild_parameter(data, requires_grad=False, hooks=None, *state):
    if not isinstance(data, torch.Tensor):
        raise ReadError('a parameter record without a tensor')
    return data


def torch_size(dims=()):
    if not isinstance(dims, (tuple, list)) or not all(isinstance(n, int) and n >= 0 for n in dims):
        raise ReadError('a torch.Size of other than sizes')
    return torch.Size(dims)


TORCH = {
    ('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor, ('torch._utils', '_rebuild_parameter'): rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): rebuild_parameter, ('torch', 'Size'): torch_size,
    **{('torch', name): dtype for name, dtype in STORAGE_DTYPES.items()},
    **{('torch', name): getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)},
}


# ---- the unpickler ------------------------------------------------------------------------------------------------
class _Memo(dict):
    def __setitem__(self, index, value):
        if not isinstance(index, int) or not 0 <= index < MAX_MEMO:
            raise ReadError(f'a pickle memo index of {index}')
        super().__setitem__(index, value)


class Unpickler(pickle._Unpickler):
    """The stdlib's pure-Python unpickler with the rules of the module docstring. `allowed`: {(module, name): what it
    builds}; `prefix_records`: module prefixes whose every class is a ModuleRecord (TorchScript's '__torch__.');
    `persistent`: the function persistent ids go to (None: refused)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, what, allowed, persistent=None, prefix_records=(), encoding='ASCII'):
        super().__init__(file, encoding=encoding)
        self.memo = _Memo()
        self.what, self.allowed, self.persistent, self.prefix_records = what, allowed, persistent, prefix_records

    def find_class(self, module, name):
        if self.proto < 3 and (module, name) in _compat_pickle.NAME_MAPPING:    # Python 2 names, as pickle maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif self.proto < 3:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if isinstance(module, str) and module.startswith(self.prefix_records) and self.prefix_records:
            return module_record(f'{module}.{name}')
        raise ReadError(f'it names {module}.{name}, which {self.what} does not need; refused, nothing of it ran')

    def persistent_load(self, pid):
        if self.persistent is None:
            raise ReadError(f'it refers to data outside the pickle (persistent id {str(pid)[:60]}), which {self.what} '
                            f'does not hold')
        return self.persistent(pid)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, Record):
            raise ReadError(f'it sets the state of a {type(inst).__name__} (BUILD), which {self.what} does not need')
        new = inst._build(state)
        if new is not inst:                           # the memo may hold the record: it stands for `new` from now on
            self.stack[-1] = new
            for k, v in list(self.memo.items()):
                if v is inst:
                    dict.__setitem__(self.memo, k, new)
    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self):                        # allocates its declared length before reading it
        raise ReadError('a protocol-5 bytearray, which no file read here holds')
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def unpickle(raw, what, allowed, persistent=None, prefix_records=(), encoding='ASCII'):
    """One pickle from `raw` (bytes or a memory map) as data, checked by check_tree. Any failure: ReadError."""
    f = raw if hasattr(raw, 'read') else io.BytesIO(raw)
    try:
        obj = Unpickler(f, what, allowed, persistent, prefix_records, encoding).load()
    except ReadError:
        raise
    except RecursionError:
        raise ReadError('nested too deeply') from None
    except MemoryError:
        raise ReadError('it asks for more memory than there is') from None
    except Exception as e:                      # truncated, not a pickle, a builder's TypeError, ...  # noqa: BLE001
        raise ReadError(f'not a readable pickle ({type(e).__name__}: {str(e)[:120]})') from None
    check_tree(obj)
    return obj


def read_pickle_file(path, what, allowed, persistent=None, prefix_records=(), encoding='ASCII'):
    """unpickle() of a file, read through a memory map; errors name the path."""
    try:
        with open(path, 'rb') as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ReadError('an empty file')
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return unpickle(m, what, allowed, persistent, prefix_records, encoding)
    except OSError as e:
        raise ReadError(f'{path}: {e.strerror or e}') from None
    except ReadError as e:
        raise ReadError(f'{path}: {e}') from None


def check_tree(obj):
    """Walk obj once (containers, records, tensors): refuse a module record reached twice (a DAG or a cycle through
    the memo), more than MAX_DEPTH levels, more than MAX_TENSORS tensors. Shared plain values (a list that two
    constructors' kwargs both hold, as EDM's do) are fine and walked once."""
    seen, modules, tensors = set(), set(), 0
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ReadError(f'nested more than {MAX_DEPTH} levels deep')
        if isinstance(o, torch.Tensor):
            tensors += 1
            if tensors > MAX_TENSORS:
                raise ReadError(f'more than {MAX_TENSORS} tensors')
            continue
        if isinstance(o, ModuleRecord):
            if id(o) in modules:
                raise ReadError(f'the module {o.class_name} is reached twice (its modules form a graph with a shared '
                                f'node or a cycle, not a tree)')
            modules.add(id(o))
            children = [o.state]
        elif isinstance(o, (dict, list, tuple, set, frozenset)):
            if id(o) in seen:
                continue
            seen.add(id(o))
            children = list(o.values()) + list(o.keys()) if isinstance(o, dict) else list(o)
        else:
            continue
        stack.extend((c, depth + 1) for c in children)


# ---- torch.save files ----------------------------------------------------------------------------------------------
def check_zip(path):
    """A torch.save zip whose every record is whole: the CRC-32 of each, as zip readers check and torch.load does
    not (flipped bytes inside a tensor would otherwise load silently)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            script = any(n.split('/')[1:2] == ['code'] for n in z.namelist())
    except zipfile.BadZipFile as e:
        raise ReadError(f'{path}: not a torch.save zip archive ({e})') from None
    except OSError as e:
        raise ReadError(f'{path}: {e.strerror or e}') from None
    except Exception as e:  # noqa: BLE001 - a zip with a broken directory: one line
        raise ReadError(f'{path}: a damaged zip archive ({type(e).__name__}: {e})') from None
    if bad is not None:
        raise ReadError(f'{path}: its record {bad} fails its CRC check: the file is corrupted (copy it again)')
    if script:
        raise ReadError(f'{path}: a TorchScript archive (it carries code), not weights; refused unread')


def torch_load(path):
    """torch.load(weights_only=True) of a torch.save zip, after check_zip; then every tensor is checked to be dense
    (a stride-0 tensor could stand for gigabytes) and the tree bounded. One ReadError line for any failure."""
    check_zip(path)
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:                       # a global that weights_only does not allow
        what = [line.strip() for line in str(e).splitlines() if 'GLOBAL' in line] or [type(e).__name__]
        raise ReadError(f'{path} holds more than weights and numbers, and loading it would run code it carries; '
                        f'refused unread ({what[0][:160]})') from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ReadError(f'{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""})') \
            from None
    try:
        check_tree(obj)
        for t in tensors_of(obj):
            check_dense(tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                        t.untyped_storage().nbytes() // max(t.element_size(), 1))
    except ReadError as e:
        raise ReadError(f'{path}: {e}') from None
    return obj


def tensors_of(obj):
    """Every tensor in a checked tree (dicts, lists, tuples)."""
    stack, seen = [obj], set()
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, (dict, list, tuple)) and id(o) not in seen:
            seen.add(id(o))
            stack.extend(o.values() if isinstance(o, dict) else o)


# ---- torch's legacy format (a storage pickled by pickle.dump: torch.storage._load_from_bytes) ----------------------
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def legacy_storage(raw):
    """The storage inside torch.storage._load_from_bytes(raw): torch.save's legacy stream (magic, protocol, sys info,
    the object as a persistent id, the storage keys, then for each key its element count and bytes), parsed here
    with the restricted unpickler; the counts are checked against the bytes that are there before anything is
    allocated."""
    if not isinstance(raw, (bytes, bytearray)):
        raise ReadError('a storage record without bytes')
    f = io.BytesIO(raw)
    what = 'a pickled torch storage'
    ids = {}

    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage' and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str)):
            raise ReadError(f'a storage id {str(pid)[:60]} of another form than torch writes')
        ids[pid[2]] = (pid[1], pid[4])
        return pid[2]
    if unpickle(f, what, {}) != LEGACY_MAGIC or unpickle(f, what, {}) != 1001:
        raise ReadError('a storage record that is not torch\'s legacy format')
    unpickle(f, what, {})                                        # sys info: a dict of plain values
    key = unpickle(f, what, TORCH, persistent)
    keys = unpickle(f, what, {})
    if not isinstance(key, str) or keys != [key] or key not in ids:
        raise ReadError('a storage record holding other than one storage')
    dtype, numel = ids[key]
    head = f.read(8)
    if len(head) != 8 or int.from_bytes(head, 'little', signed=True) != numel:
        raise ReadError('a storage record whose size does not match its header')
    size = torch.empty((), dtype=dtype).element_size()
    rest = raw[f.tell():]
    if numel * size != len(rest):
        raise ReadError(f'a storage record of {numel} elements with {len(rest)} bytes')
    return storage_from(rest, dtype, numel)
