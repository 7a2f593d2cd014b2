"""Command-line pieces shared by gapt.cli and the command modules beside the layers they drive
(gapt.seg.commands, gapt.protocol.*_commands): those sit below the cli layer and must not import
it. Nothing heavy is imported at module level (``gapt --help`` stays fast)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import List


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
    """--device (and --data-root) of the commands that use a finished run; see run_overrides."""
    parser.add_argument("--device", help="instead of the run's (auto | cpu | cuda | cuda:N)")
    if data_root:
        parser.add_argument("--data-root", help="the dataset's folder, if it moved since training")


def run_overrides(args) -> List[str]:
    """--device / --data-root of eval and predict, as overrides of the run's saved config."""
    out = [f"device={args.device}"] if args.device else []
    if getattr(args, "data_root", None):
        out.append(f"data.root={args.data_root}")
    return out
