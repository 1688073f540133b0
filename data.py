"""Datasets of pixels for training and evaluating consistency models: MNIST, Fashion-MNIST, CIFAR-10, image folders
and zips (EDM2's dataset tool's among them); plus image grids and single-image I/O. SD-VAE latents: latents.py.

Pixels come out in [-1, 1] (x / 127.5 - 1), the range whose standard deviation is about sigma_d = 0.5 (sCM §2.1).
Every bad input raises DataError with one line that names the path and what was expected.
Imports torch, numpy, pillow, tqdm and the standard library only.
"""
import gzip
import hashlib
import io
import json
import math
import os
import tarfile
import urllib.request
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import safe_pickle

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
GRAY_MODES = ('1', 'L', 'LA')                   # read as 1 channel; every other PIL mode is converted to RGB

# Where the named datasets come from, and the md5 of each original file (checked on download only).
FASHION_URL = 'https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/'
FASHION_MD5 = {
    'train-images-idx3-ubyte.gz': '8d4fb7e6c68d591d4c3dfef9ec88bf0d',
    'train-labels-idx1-ubyte.gz': '25c81989df183df01b3e8a0aad5dffbe',
    't10k-images-idx3-ubyte.gz': 'bef4ecab320f06d8554ea6380940ec79',
    't10k-labels-idx1-ubyte.gz': 'bb300cfdad3c16e7a12a480ee83cd310',
}
MNIST_URL = 'https://ossci-datasets.s3.amazonaws.com/mnist/'
MNIST_MD5 = {
    'train-images-idx3-ubyte.gz': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
    'train-labels-idx1-ubyte.gz': 'd53e105ee54ea40749a09fcbcd1e9432',
    't10k-images-idx3-ubyte.gz': '9fb629c4189551a2d022fa330f9573f3',
    't10k-labels-idx1-ubyte.gz': 'ec29112dd5afa0611ce80d1b7f02629c',
}
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR_MD5 = 'c58f30108f718f92721af3b95e74349a'
# CIFAR-10's label order (batches.meta) is alphabetical, so sorted class folders of the JPEG copy give the same labels.
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR_COUNT = {'train': 50000, 'test': 10000}   # 5 batches of 10000, and one test batch

NAMES = ('mnist', 'fashion-mnist', 'cifar10')


class DataError(Exception):
    """A bad data input: the message is one line that names the path and what was expected."""


def default_data_dir():
    """Where named datasets live: $SCM_DATA if set, else ~/.cache/scm."""
    return os.path.expanduser(os.environ.get('SCM_DATA') or os.path.join('~', '.cache', 'scm'))


# ---------------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """Items (x, label): x float32 [C,H,W], pixels in [-1, 1]; label int, -1 when unlabeled.

    Holds exactly one of: `images`, a uint8 tensor [N,C,H,W] in memory (named datasets); `files`, image paths in a
    folder or members of a zip (`zip_path`), decoded lazily and center-cropped to `crop` if given. (SD-VAE latents:
    latents.LatentDataset, with the same interface.)
    """

    is_latent = False

    def __init__(self, name, shape, labels, num_classes, images=None, files=None, zip_path=None, crop=None):
        self.name = name
        self.shape = tuple(shape)
        self.labels = labels                    # long tensor [N]
        self.num_classes = num_classes
        self.images = images
        self.files = files
        self.zip_path = zip_path
        self.crop = crop
        self._zip, self._zip_pid = None, None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.images is not None:
            x = self.images[i].float() / 127.5 - 1
        else:
            x = self._read_file(self.files[i])
        return x, int(self.labels[i])

    def get_batch(self, indices, seed=None):
        """x [B,C,H,W] float32 and labels [B] long for the given indices (a list, array or tensor); seed is for
        latents.LatentDataset's posterior samples (none drawn here)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self.images is not None:
            x = self.images[idx].float() / 127.5 - 1
        else:
            x = torch.stack([self._read_file(self.files[i]) for i in idx.tolist()])
        return x, self.labels[idx]

    def _read_file(self, f):
        """Decode one image of a folder or zip to [C,H,W] in [-1, 1]; center-cropped to self.crop if set, else
        its size must match the first image's."""
        where = f'{self.zip_path}:{f}' if self.zip_path else f
        raw = self._zipfile().read(f) if self.zip_path else None
        img = _open_image(io.BytesIO(raw) if raw is not None else f, where)
        C, H, W = self.shape
        if self.crop:
            img = center_crop(img, self.crop)
        if img.size != (W, H):
            raise DataError(f'data: {where} is {img.size[0]}x{img.size[1]} but the first image of {self.name} is '
                            f'{W}x{H}; all images must have the same size')
        return _pil_to_tensor(img, C)

    def _zipfile(self):
        # One ZipFile per process: DataLoader workers fork, and a shared file handle would interleave their reads.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.zip_path), os.getpid()
        return self._zip

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_zip'], state['_zip_pid'] = None, None  # an open ZipFile cannot be pickled (spawned workers)
        return state


def _open_image(src, where):
    """PIL image from a path or file object, fully decoded; DataError if it is not a readable image."""
    try:
        img = Image.open(src)
        img.load()
        return img
    except FileNotFoundError:
        raise DataError(f'data: {where} does not exist') from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f'data: cannot read {where} as an image ({e})') from None


def center_crop(img, resolution):
    """ADM's ImageNet preprocessing, which EDM2's dataset tool applies (--transform=center-crop-dhariwal): halve with
    a box filter while the short side is >= 2x the target, resize bicubically so the short side is `resolution`,
    then cut the central resolution x resolution square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _pil_to_tensor(img, channels):
    """PIL image -> float32 [C,H,W] in [-1, 1], converting the mode to 'L' (C=1) or 'RGB' (C=3)."""
    a = np.asarray(img.convert('L' if channels == 1 else 'RGB'), dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------

def load_dataset(spec, data_dir=None, split='train', download=True, crop=None):
    """A dataset from a name ('mnist', 'fashion-mnist', 'cifar10') or a path (image folder, .zip of images). Named
    datasets live in data_dir (default default_data_dir()) and are downloaded if missing and download is True. split
    ('train' or 'test') applies to named datasets only. A name wins over a folder of the same name in the current
    directory (pass './mnist' for the folder). crop: center-crop the images of a folder or zip to crop x crop (ADM /
    EDM2, for images of different sizes)."""
    spec = os.fspath(spec)
    if spec in NAMES:
        if split not in ('train', 'test'):
            raise DataError(f"data: split must be 'train' or 'test', got {split!r}")
        data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else default_data_dir()
        if spec == 'cifar10':
            return _load_cifar10(data_dir, split, download)
        return _load_mnist_like(spec, data_dir, split, download)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _load_image_files(spec, path, is_zip=False, crop=crop)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext == '.zip':
            return _load_image_files(spec, path, is_zip=True, crop=crop)
        if ext == '.npy':
            raise DataError(f'data: {spec} is a .npy of latents; latents.load reads those (train_util.load_data does)')
        raise DataError(f"data: {spec} is a file but not a .zip of images")
    raise DataError(f"data: '{spec}' is not a dataset name ({', '.join(NAMES)}) nor an existing folder or .zip")


# ---------------------------------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------------------------------

def _download(url, dest, md5):
    """Fetch url to dest through a temp file in dest's folder; check its md5, then move it into place."""
    folder = os.path.dirname(dest)
    hint = f'place the files in {folder} or set SCM_DATA / --data-dir'
    tmp = f'{dest}.{os.getpid()}.part'          # per process: parallel ranks may download at once
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f'data: cannot create {folder} ({e.strerror}) to download {url}; {hint}') from None
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, 'wb') as out:
            total = int(r.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=os.path.basename(dest)) as bar:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as e:          # URLError, HTTPError, timeouts and disk errors are all OSError
        _remove(tmp)
        raise DataError(f'data: download of {url} failed ({e}); {hint}') from None
    except BaseException:                       # Ctrl-C: leave no partial file behind
        _remove(tmp)
        raise
    if h.hexdigest() != md5:
        _remove(tmp)
        raise DataError(f'data: {os.path.basename(dest)} from {url} has md5 {h.hexdigest()}, expected {md5}; '
                        f'the download is corrupt or the file changed upstream; {hint}')
    os.replace(tmp, dest)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _fetch_missing(name, folder, files, base_url, md5s, download):
    """Make sure every file in files exists in folder, downloading the missing ones if allowed."""
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing and not download:
        raise DataError(f"data: {name} is missing {', '.join(missing)} in {folder}; place the files there, "
                        f"allow downloading, or set SCM_DATA / --data-dir")
    for f in missing:
        _download(base_url + f, os.path.join(folder, f), md5s[f])


# ---------------------------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files, http://yann.lecun.com/exdb/mnist/)
# ---------------------------------------------------------------------------------------------------------------------

def _read_idx(path, ndim):
    """Array from a gzipped IDX file of unsigned bytes with ndim dimensions (magic 0x0000 08 ndim)."""
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f'data: cannot read {path} as a gzipped IDX file ({e})') from None
    magic = 0x800 + ndim                        # 0x08 = unsigned byte data, then the number of dimensions
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f'data: {path} is too short ({len(raw)} bytes) to be an IDX file')
    if int.from_bytes(raw[:4], 'big') != magic:
        raise DataError(f'data: {path} is not an IDX file of {ndim}-d unsigned bytes '
                        f"(magic number {int.from_bytes(raw[:4], 'big'):#010x}, expected {magic:#010x})")
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], 'big') for k in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise DataError(f'data: {path} holds {len(body)} bytes of data but its header says {dims}')
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _load_mnist_like(name, data_dir, split, download):
    """MNIST or Fashion-MNIST: 28x28 grayscale, 10 classes, all in memory as uint8 [N,1,28,28]."""
    folder = os.path.join(data_dir, name)
    prefix = 'train' if split == 'train' else 't10k'
    img_file, lbl_file = f'{prefix}-images-idx3-ubyte.gz', f'{prefix}-labels-idx1-ubyte.gz'
    url, md5s = (MNIST_URL, MNIST_MD5) if name == 'mnist' else (FASHION_URL, FASHION_MD5)
    _fetch_missing(f'{name} ({split})', folder, [img_file, lbl_file], url, md5s, download)
    # Local files are not checksum-checked (copies may be recompressed); they are checked structurally here.
    images = _read_idx(os.path.join(folder, img_file), 3)
    labels = _read_idx(os.path.join(folder, lbl_file), 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f'data: {os.path.join(folder, img_file)} holds images of {images.shape[1:]}, expected 28x28')
    if len(labels) != len(images):
        raise DataError(f'data: {os.path.join(folder, lbl_file)} has {len(labels)} labels but {img_file} has '
                        f'{len(images)} images')
    if labels.size and labels.max() > 9:
        raise DataError(f'data: {os.path.join(folder, lbl_file)} has label {labels.max()}, expected 0..9')
    return ImageDataset(name, (1, 28, 28), torch.from_numpy(labels.astype(np.int64)), 10,
                        images=torch.from_numpy(images.copy()).unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10 (https://www.cs.toronto.edu/~kriz/cifar.html), or its JPEG copy
# ---------------------------------------------------------------------------------------------------------------------

def _load_cifar10(data_dir, split, download):
    """CIFAR-10: 32x32 RGB, 10 classes, all in memory as uint8 [N,3,32,32]. Prefers the JPEG copy
    <data_dir>/cifar10-jpeg/<split>.tar.gz when it exists, else the official python tarball."""
    jpeg_tar = os.path.join(data_dir, 'cifar10-jpeg', f'{split}.tar.gz')
    if os.path.isfile(jpeg_tar):
        images, labels = _read_cifar_jpeg_tar(jpeg_tar, split)
    else:
        official = os.path.join(data_dir, 'cifar-10-python.tar.gz')
        if not os.path.isfile(official):
            if not download:
                raise DataError(f'data: cifar10 ({split}) needs {jpeg_tar} or {official}, found neither; place '
                                f'one there, allow downloading, or set SCM_DATA / --data-dir')
            _download(CIFAR_URL, official, CIFAR_MD5)
        images, labels = _read_cifar_official(official, split)
    return ImageDataset('cifar10', (3, 32, 32), torch.from_numpy(labels), 10, images=torch.from_numpy(images))


def _read_cifar_official(path, split):
    """The pickled batches of cifar-10-python.tar.gz: data_batch_1..5 (train) or test_batch (test)."""
    names = [f'data_batch_{k}' for k in range(1, 6)] if split == 'train' else ['test_batch']
    images, labels = [], []
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for n in names:
                try:
                    f = tar.extractfile(f'cifar-10-batches-py/{n}')
                except KeyError:
                    raise DataError(f'data: {path} has no cifar-10-batches-py/{n}; expected the official '
                                    f'cifar-10-python.tar.gz') from None
                if f is None or tar.getmember(f'cifar-10-batches-py/{n}').size > 2 ** 26:
                    raise DataError(f'data: {path}: cifar-10-batches-py/{n} is not a file of a CIFAR-10 batch\'s '
                                    f'size (30 MB)')
                # arrays and plain values only (safe_pickle: a batch cannot run code, crash or blow up memory)
                try:
                    batch = safe_pickle.unpickle(f.read(), 'a CIFAR-10 batch', safe_pickle.NUMPY, encoding='bytes')
                except safe_pickle.ReadError as e:
                    raise DataError(f'data: {path}: cifar-10-batches-py/{n} is not plain data: {e}') from None
                x, y = batch.get(b'data') if isinstance(batch, dict) else None, batch.get(b'labels') \
                    if isinstance(batch, dict) else None
                if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072
                        and isinstance(y, list) and len(y) == len(x) and all(type(v) is int for v in y)):
                    raise DataError(f'data: {path}: cifar-10-batches-py/{n} is not a CIFAR-10 batch (a dict of '
                                    f'b\'data\': uint8 [N, 3072] and b\'labels\': N ints)')
                images.append(x.reshape(-1, 3, 32, 32))
                labels.append(np.asarray(y, dtype=np.int64))
    except DataError:
        raise
    except (OSError, EOFError, tarfile.TarError, zlib.error, KeyError, ValueError) as e:
        raise DataError(f'data: cannot read {path} as the official CIFAR-10 python tarball ({e!r})') from None
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) != CIFAR_COUNT[split] or len(labels) != len(images) or labels.min() < 0 or labels.max() > 9:
        raise DataError(f'data: {path} holds {len(images)} {split} images and {len(labels)} labels, '
                        f'expected {CIFAR_COUNT[split]} of each with labels 0..9')
    return images, labels


def _read_cifar_jpeg_tar(path, split):
    """The JPEG copy: one JPEG per image under <split>/<class>/NNNN.jpg; label = index of the sorted class names."""
    members = []                                # (member name, JPEG bytes), all read first (16 MB for train)
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for m in tar:
                if m.isfile() and m.name.lower().endswith(('.jpg', '.jpeg')):
                    members.append((m.name, tar.extractfile(m).read()))
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise DataError(f'data: cannot read {path} as a .tar.gz of JPEGs ({e})') from None
    members.sort()
    classes = sorted({n.split('/')[-2] if '/' in n else '' for n, _ in members})
    if tuple(classes) != CIFAR_CLASSES or len(members) != CIFAR_COUNT[split]:
        raise DataError(f'data: {path} holds {len(members)} JPEGs in class folders {classes}, expected '
                        f'{CIFAR_COUNT[split]} in {list(CIFAR_CLASSES)}')
    index = {c: k for k, c in enumerate(classes)}
    images = np.empty((len(members), 3, 32, 32), dtype=np.uint8)
    labels = np.empty(len(members), dtype=np.int64)
    for k, (n, b) in enumerate(tqdm(members, desc=f'decoding cifar10 {split}', unit='img', leave=False)):
        img = _open_image(io.BytesIO(b), f'{path}:{n}')
        if img.size != (32, 32):
            raise DataError(f'data: {path}:{n} is {img.size[0]}x{img.size[1]}, expected 32x32')
        images[k] = np.asarray(img.convert('RGB')).transpose(2, 0, 1)
        labels[k] = index[n.split('/')[-2]]
    return images, labels


# ---------------------------------------------------------------------------------------------------------------------
# Image folders and zips
# ---------------------------------------------------------------------------------------------------------------------

def _class_names(rel_paths):
    """Class of each image = its first folder under the root (after stripping folders that wrap everything, as a
    zip of 'photos/' does), when every image lies in one of at least 2 such folders; else None (unlabeled)."""
    parts = [p.split('/') for p in rel_paths]
    while all(len(q) > 1 for q in parts) and len({q[0] for q in parts}) == 1:
        parts = [q[1:] for q in parts]
    if any(len(q) == 1 for q in parts) or len({q[0] for q in parts}) < 2:
        return None
    return [q[0] for q in parts]


def _is_image_name(rel):
    parts = rel.split('/')                      # skip hidden files and macOS zip metadata (__MACOSX/._x.png)
    return rel.lower().endswith(IMAGE_EXTS) and not any(q.startswith('.') or q == '__MACOSX' for q in parts)


def _dataset_json_labels(path, is_zip, rel):
    """(labels, num_classes) from the dataset.json at the root of a folder or zip, as EDM2's dataset_tool.py writes it
    ({"labels": [[file, label], ...]} or null) and its ImageFolderDataset reads it: classes = largest label + 1, so
    ImageNet's class ids survive a subset of classes. None when there is no dataset.json."""
    where = f'dataset.json in {path}'
    try:
        if is_zip:
            with zipfile.ZipFile(path) as z:
                text = z.read('dataset.json') if 'dataset.json' in z.namelist() else None
        else:
            f = os.path.join(path, 'dataset.json')
            if not os.path.isfile(f):
                return None
            with open(f, 'rb') as fh:
                text = fh.read()
        if text is None:
            return None
        pairs = json.loads(text)['labels']
        if pairs is None:
            return torch.full((len(rel),), -1, dtype=torch.long), 0
        by_name = {str(f).replace('\\', '/'): int(y) for f, y in pairs}
        labels = torch.tensor([by_name[r] for r in rel], dtype=torch.long)
    except KeyError as e:
        raise DataError(f'data: {where} has no entry {e.args[0]!r}') from None
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f'data: cannot read {where} as EDM2\'s {{"labels": [[file, label], ...]}} ({e})') from None
    if labels.min() < 0:
        raise DataError(f'data: {where} has a negative label')
    return labels, int(labels.max()) + 1


def _load_image_files(name, path, is_zip, crop=None):
    """A folder or zip of images, decoded lazily. Labels from dataset.json (EDM2's dataset_tool.py), else from class
    folders. Channels and size come from the first image (sorted paths); size crop x crop if crop is given."""
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                rel = sorted(n for n in z.namelist() if not n.endswith('/') and _is_image_name(n))
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f'data: cannot read {path} as a zip file ({e})') from None
        files = rel
    else:
        rel = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in names:
                r = os.path.relpath(os.path.join(root, n), path).replace(os.sep, '/')
                if _is_image_name(r):
                    rel.append(r)
        rel.sort()
        files = [os.path.join(path, *r.split('/')) for r in rel]
    if not rel:
        raise DataError(f"data: no images ({', '.join(IMAGE_EXTS)}) found in {path}")

    edm2 = _dataset_json_labels(path, is_zip, rel)          # EDM2's dataset_tool.py layout: labels by file name
    if edm2 is not None:
        labels, num_classes = edm2
    elif (classes := _class_names(rel)) is None:
        labels, num_classes = torch.full((len(rel),), -1, dtype=torch.long), 0
    else:
        index = {c: k for k, c in enumerate(sorted(set(classes)))}
        labels, num_classes = torch.tensor([index[c] for c in classes], dtype=torch.long), len(index)

    if is_zip:
        with zipfile.ZipFile(path) as z:
            first = _open_image(io.BytesIO(z.read(files[0])), f'{path}:{files[0]}')
    else:
        first = _open_image(files[0], files[0])
    channels = 1 if first.mode in GRAY_MODES else 3
    shape = (channels, crop, crop) if crop else (channels, first.size[1], first.size[0])
    return ImageDataset(name, shape, labels, num_classes, files=files, zip_path=path if is_zip else None, crop=crop)


# ---------------------------------------------------------------------------------------------------------------------
# Image I/O
# ---------------------------------------------------------------------------------------------------------------------

def to_uint8(x):
    """x in [-1, 1], float [N,C,H,W] -> numpy uint8 [N,H,W,C], round((x + 1) * 127.5) clipped to 0..255."""
    x = x.detach().float().cpu()
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(x, path, nrow=None, padding=2):
    """Save images x in [-1, 1], [N,C,H,W] with C = 1 or 3, as one grid image: nrow images per row (default
    ceil(sqrt(N))), `padding` black pixels between and around them (as torchvision's make_grid). Written atomically."""
    a = to_uint8(x)
    N, H, W, C = a.shape
    if C not in (1, 3):
        raise ValueError(f'save_grid: images must have 1 or 3 channels, got {C}')
    ncol = nrow or math.ceil(math.sqrt(N))
    nrows = math.ceil(N / ncol)
    grid = np.zeros((nrows * (H + padding) + padding, ncol * (W + padding) + padding, C), dtype=np.uint8)
    for k in range(N):
        r, c = divmod(k, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top:top + H, left:left + W] = a[k]
    img = Image.fromarray(grid[:, :, 0] if C == 1 else grid, 'L' if C == 1 else 'RGB')
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), 'PNG')
    tmp = path + '.tmp'                         # same folder, so os.replace is atomic
    try:
        img.save(tmp, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def load_image(path, channels):
    """Read one image file (PNG, JPG, ...) as a float tensor [1,C,H,W] in [-1, 1]; channels 1 ('L') or 3 ('RGB')."""
    if channels not in (1, 3):
        raise ValueError(f'load_image: channels must be 1 or 3, got {channels}')
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        raise DataError(f'data: {path} is a folder, expected an image file')
    return _pil_to_tensor(_open_image(path, path), channels)[None]
