"""Figures for the README from what reproduce.sh wrote.

  python plot.py hero runs/repro-fashion-s/grids figures/hero.png     # teacher | sCD 1 step | sCD 2 steps

Imports pillow only.
"""
import argparse
import os

from PIL import Image, ImageDraw


def hero(grids, out, panels=(('teacher-heun35', 'teacher, 35 NFE'), ('scd-1step', 'sCD, 1 NFE'),
                             ('scd-2step', 'sCD, 2 NFE'))):
    """The grids side by side, each under its caption, on white."""
    images = [Image.open(os.path.join(grids, f'{name}.png')).convert('RGB') for name, _ in panels]
    w, h = images[0].size
    pad, top = 8, 20
    canvas = Image.new('RGB', (len(images) * (w + pad) + pad, h + top + pad), 'white')
    draw = ImageDraw.Draw(canvas)
    for i, (img, (_, caption)) in enumerate(zip(images, panels)):
        x = pad + i * (w + pad)
        canvas.paste(img.resize((w, h)), (x, top))
        draw.text((x + 2, 4), caption, fill='black')
    tmp = out + '.tmp.png'
    canvas.save(tmp)
    os.replace(tmp, out)
    print(f'wrote {out}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('hero', help='teacher | sCD 1 step | sCD 2 steps from the grids of reproduce.sh')
    s.add_argument('grids', help='folder holding teacher-heun35.png, scd-1step.png, scd-2step.png')
    s.add_argument('out', help='the PNG to write')
    args = p.parse_args()
    hero(args.grids, args.out)


if __name__ == '__main__':
    main()
