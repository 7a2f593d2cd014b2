"""Command-line pieces shared by gapt.cli and the command modules beside the layers they drive
(gapt.seg.commands, gapt.protocol.*_commands): those sit below the cli layer and must not import
it. Nothing heavy is imported at module level (``gapt --help`` stays fast)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import List


def finished_and_not_forced(args, command: str) -> bool:
    """--resume on a finished run: say so (True) unless --force-eval asks to evaluate it again."""
    from .engine.runfolder import is_finished
    if not is_finished(args.resume) or args.force_eval:
        return False
    print(f"{command}: {args.resume} is finished (results.json written); nothing to resume. "
          f"--force-eval evaluates it again", file=sys.stderr)
    return True


def add_resume_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder")
    parser.add_argument("--force-eval", action="store_true",
                        help="with --resume on a finished run: run its final evaluation again")


@contextlib.contextmanager
def resume_hint_on_interrupt(out, command: str):
    """On Ctrl-C (or a scheduler's SIGINT), say what the run folder holds and how to continue."""
    try:
        yield
    except KeyboardInterrupt as e:
        from .engine.distributed import is_main
        from .engine.runfolder import resume_hint
        if is_main():
            print(f"{command}: interrupted; {resume_hint(Path(out), command)}", file=sys.stderr)
        e.reported = True
        raise


def add_run_override_args(parser: argparse.ArgumentParser, data_root: bool = True) -> None:
    """--device, --weights (and --data-root) of the commands that use a finished run; see run_overrides."""
    parser.add_argument("--device", help="instead of the run's (auto | cpu | cuda | cuda:N)")
    parser.add_argument("--weights", metavar="PATH", help="the backbone checkpoint, if it moved since training")
    if data_root:
        parser.add_argument("--data-root", help="the dataset's folder, if it moved since training")


def run_overrides(args) -> List[str]:
    """--device / --weights / --data-root of eval and predict, as overrides of the run's saved config."""
    out = [f"device={args.device}"] if args.device else []
    if getattr(args, "weights", None):
        out.append(f"weights={args.weights}")
    if getattr(args, "data_root", None):
        out.append(f"data.root={args.data_root}")
    return out
