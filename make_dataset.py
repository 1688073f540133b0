"""Resize and center-crop a folder of images into the dataset EDM2's `dataset_tool.py convert` writes, as its
`--transform=center-crop-dhariwal` does (ADM's ImageNet preprocessing: data.center_crop):

  python make_dataset.py imagenet/train --resolution 64 --out imagenet-64x64.zip    # ImageNet 64, as EDM2 ships it
  python make_dataset.py photos/ --resolution 32 --out photos-32                    # a folder instead of a zip

Class subfolders of the source give the labels (sorted names -> 0, 1, ...; ImageNet's synset folders -> its class
ids). The result holds img<8-digit index>.png in folders of 1000 (00000/, 00001/, ...) and dataset.json,
{"labels": [[file, label], ...]} or null: the layout EDM2's loader reads, and data.py reads it with those labels.
Images are converted to RGB before the crop, as dataset_tool.py does. Written to a temporary name, then renamed.
"""
import argparse
import io
import json
import os
import shutil
import zipfile

from tqdm import tqdm

import cli
import data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', help='folder (or .zip) of images; class subfolders give labels')
    p.add_argument('--resolution', type=int, required=True, help='output size R: R x R pixels (ImageNet 64: 64)')
    p.add_argument('--out', required=True, help='a .zip to write, or a folder')
    args = p.parse_args()
    if args.resolution < 1:
        raise cli.UserError(f'--resolution must be positive, not {args.resolution}')
    ds = data.load_dataset(args.source, crop=args.resolution)        # lists the files and labels; decodes nothing
    if ds.files is None:
        raise cli.UserError(f'{args.source}: make_dataset takes an image folder or a .zip of images')
    cli.check_output(args.out.rstrip('/'))
    is_zip = args.out.endswith('.zip')
    if not is_zip and os.path.exists(args.out):
        raise cli.UserError(f'{args.out} exists; name a new folder (or a .zip)')
    tmp = args.out.rstrip('/') + '.tmp'
    labels = []
    try:
        zout = zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) if is_zip else None
        for i, f in enumerate(tqdm(ds.files, desc='images', unit='img')):
            where = f'{ds.zip_path}:{f}' if ds.zip_path else f
            src = io.BytesIO(ds._zipfile().read(f)) if ds.zip_path else f
            img = data.center_crop(data._open_image(src, where).convert('RGB'), args.resolution)
            name = f'{i // 1000:05d}/img{i:08d}.png'                     # dataset_tool.py's names
            buf = io.BytesIO()
            img.save(buf, format='png', compress_level=0, optimize=False)
            if is_zip:
                zout.writestr(name, buf.getvalue())
            else:
                os.makedirs(os.path.join(tmp, name[:5]), exist_ok=True)
                with open(os.path.join(tmp, name), 'wb') as fh:
                    fh.write(buf.getvalue())
            labels.append([name, int(ds.labels[i])])
        meta = json.dumps(dict(labels=labels if ds.num_classes else None))
        if is_zip:
            zout.writestr('dataset.json', meta)
            zout.close()
        else:
            with open(os.path.join(tmp, 'dataset.json'), 'w') as fh:
                fh.write(meta)
        os.replace(tmp, args.out.rstrip('/'))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)
    print(f'wrote {args.out}: {len(ds)} images, {args.resolution}x{args.resolution} RGB, '
          + (f'{ds.num_classes} classes' if ds.num_classes else 'no labels'))


if __name__ == '__main__':
    cli.main_guard(main)
