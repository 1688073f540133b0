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
    by a signal 4, a program interrupted outside a training loop 130."""
    try:
        main()
        if dist.is_initialized():
            dist.barrier()          # every rank done with its collectives before any tears the group down
    except (UserError, data.DataError, safe_pickle.ReadError) as e:
        _close_bars()
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        _close_bars()
        print(f'stopped: {e}', file=sys.stderr)
        sys.exit(3)
    except Interrupted as e:
        _close_bars()
        print(f'interrupted: {e}', file=sys.stderr)
        sys.exit(4)
    except KeyboardInterrupt:
        _close_bars()
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
