"""The demo's worker pool: results come back under their keys, a worker's error reaches the caller,
workers end with a SIGKILLed parent, and the numbers do not depend on how many workers ran them."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gapt.demo.run import METHODS, run_demo
from gapt.demo.workers import RunPool, WorkerDied


def _square(x):
    return x * x


def _fail(x):
    raise ValueError(f"bad value {x}")


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_under_their_keys(workers):
    with RunPool(workers) as pool:
        for x in range(6):
            pool.submit(("sq", x), _square, x)
        got = dict(pool.next() for _ in range(6))
        assert pool.pending == 0
    assert got == {("sq", x): x * x for x in range(6)}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_workers_error_reaches_the_caller(workers):
    with pytest.raises(ValueError, match="bad value 3"):
        with RunPool(workers) as pool:
            pool.submit("a", _fail, 3)
            pool.next()


def _die(_):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(WorkerDied, match="run the same command again"):
        with RunPool(2) as pool:
            pool.submit("dies", _die, 0)
            pool.submit("fine", _square, 3)
            while pool.pending:
                pool.next()


def test_a_dead_worker_is_one_line_from_the_cli(monkeypatch, tmp_path, capsys):
    """gapt demo prints WorkerDied as a user-facing error (exit 1), not a traceback."""
    from gapt.cli import main
    from gapt.demo import run as demo_run

    def tune_all(*_):
        raise WorkerDied("a worker process died in the middle of a run")
    monkeypatch.setattr(demo_run, "tune_all", tune_all)
    assert main(["demo", "--quick", "--workers", "1", "--out", str(tmp_path / "d")]) == 1
    assert "gapt demo: error: a worker process died" in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (dead, not yet reaped by its new parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_the_demo_is_killed(tmp_path):
    """SIGKILL the process that owns the pool while both workers are busy: the workers go too, so a
    rerun of the demo never races an orphan still writing into a run folder."""
    script = textwrap.dedent("""
        import os, sys, time
        from gapt.demo.workers import RunPool, WorkerDied
        if __name__ == "__main__":
            with RunPool(2) as pool:
                for i in range(4):
                    pool.submit(i, os.getpid)
                pids = {pool.next()[1] for _ in range(4)}
                for i in range(2):
                    pool.submit(i, time.sleep, 600)
                print(" ".join(map(str, sorted(pids))), flush=True)
                time.sleep(600)
    """)
    path = tmp_path / "owner.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
        time.sleep(0.5)   # both workers are inside time.sleep(600)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids), "a worker outlived the killed demo"
    finally:
        if proc.poll() is None:
            proc.kill()


def _numbers(folder):
    """Each run's metrics lines without the timings, and its results' metrics."""
    runs = {}
    for m in sorted(folder.rglob("metrics.jsonl")):
        lines = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        for line in lines:
            line.pop("images_per_s", None)
        res = m.parent / "results.json"
        runs[str(m.parent.relative_to(folder))] = (lines, json.loads(res.read_text())["metrics"] if res.exists() else None)
    return runs


def test_numbers_do_not_depend_on_the_worker_count(tmp_path):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers run one thread each
    try:
        one = run_demo(str(tmp_path / "one"), quick=True, tasks=("shape",), methods=METHODS[1:3], workers=1)
    finally:
        torch.set_num_threads(threads)
    two = run_demo(str(tmp_path / "two"), quick=True, tasks=("shape",), methods=METHODS[1:3], workers=2)
    assert one == two
    a, b = _numbers(tmp_path / "one"), _numbers(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 2 * 3
    for run in a:
        metrics_a, metrics_b = a[run][1], b[run][1]
        assert a[run][0] == b[run][0], run
        if metrics_a is not None:
            metrics_a.pop("eval_images_per_s", None), metrics_b.pop("eval_images_per_s", None)
            assert metrics_a == metrics_b, run


def test_a_negative_worker_count_is_a_named_error(capsys):
    from gapt.cli import main
    assert main(["demo", "--quick", "--workers", "-1", "--out", "unused"]) == 1
    assert "--workers -1" in capsys.readouterr().err
