"""Figures for the README from what reproduce.sh wrote.

  python plot.py hero runs/repro-fashion-s/grids figures/hero.png     # teacher | sCD 1 step | sCD 2 steps
  python plot.py curve runs/repro-fashion-s/curve.txt figures/repro/fid-vs-steps.png   # FID vs training step
  python plot.py tmid runs/repro-fashion-s/tmid.txt runs/repro-fashion-s/curve.txt figures/repro/fid-vs-tmid.png
  python plot.py passes runs/repro-fashion-s/scd-1pass runs/repro-fashion-s/scd-2pass figures/repro/passes.png

`hero` needs pillow only; `curve`, `tmid` and `passes` need matplotlib (optional: `pip install matplotlib`), used nowhere else.
"""
import argparse
import json
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


NAMES = {'scd': 'sCD', 'sct': 'sCT', 'dscd1024': 'dsCD, N = 1024', 'dscd64': 'dsCD, N = 64', 'scds1': 'sCD, unguided',
         'scd-lr3e-4': 'sCD, lr 3e-4'}


def curve(path, out):
    """FID vs consistency-training step from reproduce.sh's curve.txt ("<method> <step> <NFE> <FID>"): one line per
    method and sampler (solid: 2 steps, dashed: 1 step), the teacher's FID (35 NFE) as a horizontal line."""
    plt = pyplot()
    rows = read_rows(path)
    teacher = [float(r[3]) for r in rows if r[0] == 'teacher']
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, (method, label) in enumerate(NAMES.items()):
        for nfe, style in (('2', '-'), ('1', '--')):
            pts = sorted((int(r[1]), float(r[3])) for r in rows if r[0] == method and r[2] == nfe)
            if pts:
                ax.plot(*zip(*pts), style, marker='o', ms=3, color=f'C{i}', label=f'{label}, {nfe} step' + 's' * (nfe == '2'))
    teacher_lines(ax, teacher)
    ax.set_xlabel('consistency training step (batch 128)')
    ax.set_ylabel('FID')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, handlelength=3.5, loc='upper left', bbox_to_anchor=(1.01, 1))   # outside the lines
    save(fig, out)


def tmid(path, curve_path, out):
    """2-step sCD FID against the intermediate time t of the sampler (reproduce.sh's tmid.txt: "<t> <FID>"), the
    paper's t = 1.1 marked, the teacher's FID (tmid.txt's "teacher" line, else curve.txt's) and x 1.10 / x 1.15 as
    horizontal lines."""
    plt = pyplot()
    rows = read_rows(path)
    pts = sorted((float(r[0]), float(r[1])) for r in rows if r[0] != 'teacher')
    teacher = ([float(r[1]) for r in rows if r[0] == 'teacher'] or     # on tmid.txt's own reference, if it has one
               [float(r[3]) for r in read_rows(curve_path) if r[0] == 'teacher'])
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(*zip(*pts), '-o', ms=4, color='C0', label='sCD, 2 steps (0 -> t -> 0)')
    ax.axvline(1.1, color='C0', lw=0.6, ls=':', label='paper: t = 1.1')
    teacher_lines(ax, teacher)
    ax.set_xlabel('intermediate time t (TrigFlow)')
    ax.set_ylabel('FID')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, out)


def passes(one, two, out):
    """The sCD loss of the one-pass and the two-pass run (the same teacher, seed and data: only the arithmetic
    differs) against the step, from their log.jsonl, and their largest relative difference, printed."""
    plt = pyplot()
    logs = [[json.loads(line) for line in open(os.path.join(run, 'log.jsonl'))] for run in (one, two)]
    steps = [r['step'] for r in logs[0]]
    if steps != [r['step'] for r in logs[1]]:
        raise SystemExit(f'error: {one} and {two} logged different steps')
    diff = max(abs(a['loss'] - b['loss']) / abs(b['loss']) for a, b in zip(*logs))
    print(f'loss, one pass vs two passes: largest relative difference {diff:.2e} over {len(steps)} records '
          f'(steps {steps[0]}..{steps[-1]})')
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for log, style, name in zip(logs, ('-', '--'), ('one pass', 'two passes')):
        ax.plot(steps, [r['loss'] for r in log], style, label=f'sCD, {name}')
    ax.set_xlabel('training step')
    ax.set_ylabel('sCD loss (Eq. 8)')
    ax.set_title(f'largest relative difference {diff:.1e}', fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, out)


def teacher_lines(ax, teacher):
    """The teacher's FID (the last of curve.txt's teacher lines, if any) and x 1.10 / x 1.15, as horizontal lines."""
    if teacher:
        ax.axhline(teacher[-1], color='k', lw=1, label='teacher, Heun 35 NFE')
        ax.axhline(1.1 * teacher[-1], color='k', lw=0.6, ls=':', label='teacher x 1.10')
        ax.axhline(1.15 * teacher[-1], color='k', lw=0.6, ls='-.', label='teacher x 1.15')


def pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('error: plot.py curve, tmid and passes need matplotlib (pip install matplotlib)') from None
    return plt


def read_rows(path):
    try:
        return [line.split() for line in open(path) if line.strip()]
    except OSError as e:
        raise SystemExit(f'error: cannot read {path}: {e.strerror}') from None


def save(fig, out):
    """Write the PNG atomically (a kill leaves the old file or none, never half of one)."""
    fig.tight_layout()
    tmp = out + '.tmp.png'
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    print(f'wrote {out}')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('hero', help='teacher | sCD 1 step | sCD 2 steps from the grids of reproduce.sh')
    s.add_argument('grids', help='folder holding teacher-heun35.png, scd-1step.png, scd-2step.png')
    s.add_argument('out', help='the PNG to write')
    s.add_argument('--panels', nargs='+', metavar='NAME=CAPTION', help='other grids of the folder, with captions')
    s = sub.add_parser('curve', help='FID vs training step from curve.txt (needs matplotlib)')
    s.add_argument('curve', help="reproduce.sh's curve.txt")
    s.add_argument('out', help='the PNG to write')
    s = sub.add_parser('tmid', help='2-step FID against the intermediate time from tmid.txt (needs matplotlib)')
    s.add_argument('tmid', help="reproduce.sh's tmid.txt")
    s.add_argument('curve', help="reproduce.sh's curve.txt (for the teacher's FID)")
    s.add_argument('out', help='the PNG to write')
    s = sub.add_parser('passes', help='the loss of a one-pass and a two-pass sCD run (needs matplotlib)')
    s.add_argument('one', help='the one-pass run folder')
    s.add_argument('two', help='the two-pass run folder (--two-pass)')
    s.add_argument('out', help='the PNG to write')
    args = p.parse_args()
    if args.command == 'hero':
        hero(args.grids, args.out, *([[kv.split('=', 1) for kv in args.panels]] if args.panels else []))
    elif args.command == 'curve':
        curve(args.curve, args.out)
    elif args.command == 'passes':
        passes(args.one, args.two, args.out)
    else:
        tmid(args.tmid, args.curve, args.out)


if __name__ == '__main__':
    main()
