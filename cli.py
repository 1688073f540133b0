"""What every command-line script of the project shares: bad input reported as one `error:` line with exit code 2
(and the training scripts' other exit codes), the check that an output can be written before any work, and the
process group under torchrun. Imports torch, tqdm and data.py only, so every script can import it.
"""
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import safe_pickle


class UserError(Exception):
    """A problem with the command line or the inputs, reported in one line (exit code 2)."""


class NonFiniteError(Exception):
    """A NaN or Inf in the loss, one of its terms or the gradient (exit code 3)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT: the run finished its step and wrote a checkpoint (exit code 4)."""


def main_guard(main):
    """Run main(); print user errors as one `error:` line and exit 2; a stopped non-finite run exits 3, a run stopped
    by a signal 4, a program interrupted outside a training loop 130. Under torchrun the process group is torn down
    here and the process leaves with os._exit, after flushing: see _leave."""
    try:
        code = _outcome(main)
    except BaseException:                # a bug: its traceback as usual
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.destroy_process_group()
        _leave(code)
    if code:
        sys.exit(code)


def _outcome(main):
    """main()'s exit code: 0, or that of an expected stop, after printing its one line."""
    try:
        main()
        if dist.is_initialized():
            dist.barrier()          # every rank done with its collectives before any tears the group down
        return 0
    except (UserError, data.DataError, safe_pickle.ReadError) as e:
        return _say(f'error: {e}', 2)
    except NonFiniteError as e:
        return _say(f'stopped: {e}', 3)
    except Interrupted as e:
        return _say(f'interrupted: {e}', 4)
    except KeyboardInterrupt:
        return _say('interrupted', 130)


def _say(line, code):
    _close_bars()
    print(line, file=sys.stderr)
    return code


def _leave(code):
    """Exit a torchrun worker without the interpreter's finalization. A DDP module keeps the process group alive after
    destroy_process_group (torch 2.13), so its gloo worker threads outlive it; one that releases the last collective
    while the interpreter finalizes needs the GIL for a tensor's Python object and aborts the process
    ('terminate called without an active exception', seen in a core dump: ~AsyncAllgatherWork -> decref_pyobject ->
    take_gil -> pthread_exit). Every file is written and closed by now (atomic writes), so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _close_bars():
    """Close open progress bars, so that the message printed next is the last line."""
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()


def check_output(path):
    """Fail before the work, not after it: path must name a file in a folder we can write (created if missing)."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder; name the file to write')
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the folder of {path}: {e.strerror}') from None
    if not os.access(folder, os.W_OK):
        raise UserError(f'cannot write {path}: {folder} is not writable')


def init_distributed():
    """(rank, world, device): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python` runs one process."""
    if 'RANK' in os.environ:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f'cuda:{os.environ.get("LOCAL_RANK", 0)}' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    return rank, world, device
