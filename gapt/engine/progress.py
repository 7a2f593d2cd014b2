"""Progress: a tqdm bar on a terminal, plain log lines otherwise (CI, files, torchrun ranks > 0 stay quiet)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Dict, Optional

log = logging.getLogger("gapt")

BARS = True   # False: never draw a bar (e.g. in a worker process that shares the terminal with others)


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, log_every: Optional[int] = None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.count, self.start = 0, time.time()
        self.log_every = log_every or max(1, total // 5)
        self.bar = None
        if enabled and BARS and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **stats) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix({k: _fmt(v) for k, v in stats.items()}, refresh=False)
        elif self.count % self.log_every == 0 or self.count == self.total:
            elapsed = time.time() - self.start
            eta = elapsed / self.count * (self.total - self.count)
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in stats.items())
            log.info("%s %d/%d %s eta %.0fs", self.desc, self.count, self.total, extra, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary(stats: Dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in stats.items())
