"""Shared pieces of the reproduction scripts (``examples/reproduce_*.py``): run fastdd commands that resume where an
earlier, interrupted invocation stopped, and print arms as mean ± std with paired differences and their 95 % intervals.

Statistics: an arm's value per unit (a distillation seed, or an evaluation run of one set) is listed in unit order;
arms compared are paired by unit. The table gives mean ± sample standard deviation (n - 1) and, per arm against a
reference arm, the mean paired difference with its two-sided 95 % Student-t interval, ``mean(d) ± t(0.975, n - 1) *
sd(d) / sqrt(n)``. An interval that contains 0 is "no detectable difference at this power", not "no difference".
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

from scipy import stats

_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def fastdd(args: Sequence[str], log: Path, threads: int = 1) -> None:
    """Run ``fastdd --threads T ARGS``, appending its output to ``log``; raise with the log's tail when it fails."""
    command = ["fastdd", "--threads", str(threads), *map(str, args)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(command)} failed (exit {status}); end of {log}:\n{tail}")


def distill(out: Path, args: Sequence[str], log: Path, threads: int = 1) -> None:
    """``fastdd distill ARGS --out OUT``, continued with ``--resume`` when OUT holds an earlier unfinished run, skipped
    when it holds the finished one."""
    if _finished(out, args):
        return  # resuming would rewrite the set, and so make its evaluation look stale
    resume = ["--resume"] if (out / "checkpoint.json").exists() else []
    if not resume and out.exists():
        args = [*args, "--overwrite"]  # a folder without a checkpoint holds nothing to keep
    fastdd(["distill", *args, "--out", out, "--quiet", *resume], log, threads)


def _finished(out: Path, args: Sequence[str]) -> bool:
    """True when OUT holds a set and a checkpoint at the ``--iterations`` that ARGS ask for."""
    args = [str(a) for a in args]
    if "--iterations" not in args or not (out / "synset.json").exists() or not (out / "checkpoint.json").exists():
        return False
    done = json.loads((out / "checkpoint.json").read_text()).get("iteration", -1)
    return done >= int(args[args.index("--iterations") + 1])


def evaluate(run: Path, args: Sequence[str], result: Path, log: Path, threads: int = 1) -> dict:
    """``fastdd evaluate RUN ARGS --json RESULT`` unless RESULT is newer than the run's set; returns the JSON."""
    synset = run / "synset.json"
    if not (result.exists() and result.stat().st_mtime >= synset.stat().st_mtime):
        fastdd(["evaluate", run, *args, "--json", result, "--quiet"], log, threads)
    return json.loads(result.read_text())


def parallel(jobs: Iterable[Callable[[], None]], workers: int) -> None:
    """Run the callables, ``workers`` at a time; the first failure is raised after the others finish."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(job) for job in jobs]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def paired_difference(arm: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``arm[i] - reference[i]`` and its 95 % Student-t interval (nan for fewer than 2 pairs)."""
    if len(arm) != len(reference):
        raise ValueError(f"paired arms need the same units, got {len(arm)} and {len(reference)} values")
    d = [a - b for a, b in zip(arm, reference)]
    mean, std = mean_std(d)
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * std / math.sqrt(len(d))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, better: int) -> str:
    """'better' / 'worse' when the interval excludes 0 (``better`` is +1 where larger is better, -1 where smaller
    is), else 'no detectable difference'."""
    if math.isnan(low):
        return "-"
    if low > 0 or high < 0:
        return "better" if (low > 0) == (better > 0) else "worse"
    return "no detectable difference"


def fmt(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def arms_table(arms: dict[str, dict[str, list[float]]], metrics: Sequence[str], digits: int = 2) -> str:
    """Markdown: one row per arm, ``mean ± std`` over its units for each metric."""
    lines = ["| arm | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, values in arms.items():
        n = len(next(iter(values.values())))
        cells = [fmt(*mean_std(values[m]), digits) if values.get(m) else "-" for m in metrics]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(
    arms: dict[str, dict[str, list[float]]], pairs: Sequence[tuple[str, str]], metrics: Sequence[str],
    better: dict[str, int], digits: int = 2,
) -> str:
    """Markdown: for each (arm, reference) pair, the paired difference per metric with its 95 % interval and verdict."""
    lines = ["| arm - reference | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm, reference in pairs:
        cells = []
        for m in metrics:
            if not arms[arm].get(m) or not arms[reference].get(m):
                cells.append("-")
                continue
            mean, low, high = paired_difference(arms[arm][m], arms[reference][m])
            interval = f"[{low:+.{digits}f}, {high:+.{digits}f}]"
            cells.append(f"{mean:+.{digits}f} {interval} {verdict(low, high, better.get(m, 1))}")
        lines.append(f"| {arm} - {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def this_command() -> str:
    return "python " + shlex.join(sys.argv)


def write_results(path: Path | None, text: str) -> None:
    say(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        say(f"\n(written to {path})")
