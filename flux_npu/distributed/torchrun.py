"""torchrun, exiting with the failing rank's own exit code.

    python -m flux_npu.distributed.torchrun [torchrun options] -m flux_npu.distributed.bootstrap script args

torchrun (torch.distributed.run) exits 1 whatever a worker's exit code was: a rank that called
sys.exit(7), or was killed by SIGKILL, gives the same 1 (and SIGTERM to torchrun a traceback). The
codes are not lost, though: the ChildFailedError torchrun raises lists every failed worker with its
exit code (negative: killed by that signal) and `get_first_failure()` picks the root cause, the
earliest by timestamp. This module runs torchrun's own parse_args/run in-process and turns that into
the exit status:

- all ranks exit 0: 0;
- a rank fails: the first failing rank's code, a signal death N as 128+N (the shell's convention:
  SIGINT 130, SIGKILL 137, SIGTERM 143); torchrun's failure table is printed as it would be;
- torchrun itself receives SIGTERM/SIGINT/SIGHUP (from `flux-npu run`, which forwards them): torchrun
  stops its workers (its own grace period, then SIGKILL) and this exits 128+signal.
"""

from __future__ import annotations

import sys


def shell_code(exitcode: int) -> int:
    """A Popen-style return code (negative: killed by that signal) as the shell reports it."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = shell_code(failure.exitcode)
        print(exc.format_msg(), file=sys.stderr)
        print(f"flux-npu run: rank {rank} failed first, with exit code {code}"
              + (f" (signal {-failure.exitcode})" if failure.exitcode < 0 else "") + "; exiting with it",
              file=sys.stderr, flush=True)
        return code if code else 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
