"""``vaelab sweep``: one ordinary run directory per value of a knob (or per point of a grid of
knobs), trained by ``vaelab train`` processes, ``--jobs`` at a time.

A point is named by the values that vary (``DIR/beta-0.5``, ``DIR/beta-4_latent-dim-10``) and trained with
``--auto-resume``: a finished run is skipped, an unfinished one continues from its last checkpoint,
so a sweep killed in the middle and started again loses at most each run's last checkpoint
interval. ``--print`` writes the command lines instead, one per line, for a scheduler's job array
or ``xargs -P``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vaelab.config import seed_int
from vaelab.errors import UserError

# the knobs a sweep may vary: flag -> (parse one value, what a value must be)


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _likelihood(text: str) -> str:
    from vaelab.parts import LIKELIHOODS

    if text not in LIKELIHOODS:
        raise ValueError
    return text


KNOBS = {
    "--beta": (_positive_float, "numbers above 0"),
    "--latent-dim": (_positive_int, "whole numbers from 1"),
    "--free-bits": (_non_negative_float, "numbers from 0"),
    "--likelihood": (_likelihood, "likelihood names"),
    "--seed": (seed_int, "whole numbers from 0 to 2^63 - 1"),
}


def parse_values(flag: str, text: str) -> list[str]:
    """A knob's values from 'a,b,c', as typed (they name the runs), each checked, none twice."""
    parse, what = KNOBS[flag]
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if not _parses(parse, t)]
    if bad:
        raise UserError(f"{flag} {text}: {bad[0]!r} is not one of {what}; give {flag} as a comma-separated list")
    if not items:
        raise UserError(f"{flag} {text!r} gives no values; give {flag} as a comma-separated list, e.g. 0.5,1,2")
    if len({parse(t) for t in items}) != len(items):
        raise UserError(f"{flag} {text} names a value twice; give each value once")
    return items


def _parses(parse, text: str) -> bool:
    try:
        parse(text)
        return True
    except (ValueError, OverflowError, argparse.ArgumentTypeError):
        return False


@dataclass(frozen=True)
class Point:
    """One run of a sweep: the knobs' values, its directory, its command line."""

    values: dict[str, object]  # flag -> value
    out: Path
    argv: list[str]  # vaelab's arguments, from "train" on

    @property
    def label(self) -> str:
        return ", ".join(f"{flag.lstrip('-')} {value}" for flag, value in self.values.items())


def _name(values: dict[str, object]) -> str:
    return "_".join(f"{flag.lstrip('-')}-{value}" for flag, value in values.items())


def plan(knobs: dict[str, list], train_args: list[str], out: Path, threads: int | None) -> list[Point]:
    """Every point of the grid of ``knobs`` (flag -> values), in order, each a ``vaelab train`` of
    ``train_args`` with the point's values, into ``out/<name>``, resumable."""
    points = []
    varied = [flag for flag, values in knobs.items() if len(values) > 1] or list(knobs)  # what names a run
    for combination in itertools.product(*knobs.values()):
        values = dict(zip(knobs, combination, strict=True))
        run = out / _name({flag: values[flag] for flag in varied})
        argv = ["train", *train_args]
        for flag, value in values.items():
            argv += [flag, str(value)]
        argv += ["--out", str(run), "--auto-resume"]
        if threads is not None:
            argv += ["--threads", str(threads)]
        points.append(Point(values, run, argv))
    return points


def finished(run: Path, config) -> bool:
    """Whether the run in ``run`` is at the end that ``config`` (the point's) asks for: its epochs, or its
    time budget, used up. A run there of other options is refused, as ``train --auto-resume`` refuses it
    (epochs and time budget may grow: the run continues)."""
    from vaelab.checkpoint import load_checkpoint
    from vaelab.runs import continued_config

    last = run / "checkpoints" / "last.pt"
    if not last.exists():
        return False
    state = load_checkpoint(last)
    try:
        config, _ = continued_config(state["config"], config, given=None)
    except UserError as err:
        raise UserError(f"the sweep's run {run} was trained with other options: {err}") from None
    if not (run / "model.safetensors").exists():
        return False
    budget = config.time_budget or 0.0
    return state["epoch"] >= config.epochs or bool(budget and state.get("elapsed", 0.0) >= budget)


# how --print's lines are run: one command per line, read whole (-d '\n': xargs strips no quotes, so the shell
# gets each line as shlex.join quoted it and expands nothing inside a path)
PIPELINE = "xargs -d '\\n' -P 3 -I{} sh -c {}"


def command_line(point: Point) -> str:
    """The point's ``vaelab train`` as one shell line (a line break in a path would make it two: refused)."""
    argv = [sys.executable, "-m", "vaelab", *point.argv]
    if any("\n" in a or "\r" in a for a in argv):
        raise UserError("an option holds a line break, which --print cannot write as one line; rename the path")
    return shlex.join(argv)


def run_sweep(points: list[Point], jobs: int, configs: dict, log=print) -> list[tuple[Point, str]]:
    """Train every unfinished point (``configs``: each point's config by its run directory), ``jobs``
    processes at a time; returns each point with what became of it ("done before", "trained", or
    "failed (exit N)"). SIGTERM or Ctrl-C stops the processes (each writes its checkpoint) and then the
    sweep."""
    from vaelab.training import signals_held

    outcome: dict[Path, str] = {}
    todo = []
    done = {p.out: finished(p.out, configs[p.out]) for p in points}  # every run checked before one starts
    for p in points:
        if done[p.out]:
            outcome[p.out] = "done before"
            log(f"{p.label}: finished before, in {p.out}")
        else:
            todo.append(p)
    running: dict[subprocess.Popen, tuple[Point, object]] = {}
    try:
        # a stop is acted on between polls: raised inside Popen, it would leave a started process unknown to the sweep
        with signals_held() as stop:
            while todo or running:
                while todo and len(running) < jobs:
                    p = todo.pop(0)
                    output = tempfile.TemporaryFile()  # noqa: SIM115 (closed when it ends); unnamed: no file of the sweep
                    log(f"{p.label}: training into {p.out}")
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "vaelab", *p.argv], stdout=output, stderr=subprocess.STDOUT
                    )
                    running[proc] = (p, output)
                time.sleep(0.2)
                stop.check()
                _collect(running, outcome, log)
    finally:  # stopped: each process writes its checkpoint and exits
        with signals_held():  # every process is told before a second stop may end the sweep
            for proc in running:
                proc.send_signal(signal.SIGTERM)
        for proc, (_, output) in running.items():  # a second Ctrl-C ends this wait, not the processes
            proc.wait()
            output.close()
    return [(p, outcome[p.out]) for p in points]


def _collect(running: dict, outcome: dict[Path, str], log) -> None:
    """What became of each process that has ended: "trained", or "failed (exit N)" with its last lines."""
    for proc in [q for q in running if q.poll() is not None]:
        p, output = running.pop(proc)
        if proc.returncode == 0:
            outcome[p.out] = "trained"
            log(f"{p.label}: done")
        else:
            output.seek(0)
            tail = [line for line in output.read().decode(errors="replace").splitlines() if line.strip()]
            outcome[p.out] = f"failed (exit {proc.returncode})"
            log(f"{p.label}: failed with exit {proc.returncode}; its last lines:")
            for line in tail[-5:]:
                log(f"    {line}")
        output.close()


def threads_per_job(jobs: int) -> int:
    """The machine's cores divided between ``jobs`` processes side by side (at least one each)."""
    from vaelab.runs import available_cores

    return max(1, available_cores() // jobs)


# the sweep's own options, and list-valued train options that are not knobs
SWEEP_OPTIONS = {"--out": 1, "--jobs": 1, "--print": 0, **{flag: 1 for flag in KNOBS}}
LISTS = ("--hidden", "--top-hidden")
PATHS = ("--out", "--data", "--data-dir", "--config")  # options whose values are paths, where a comma is a letter


def _option(token: str) -> str:
    return token.split("=", 1)[0]


def check_sweepable(argv: list[str]) -> None:
    """A list given to a train option that is not a knob: say which knobs a sweep varies. (A path may
    hold a comma.)"""
    for flag, value in zip(argv, argv[1:] + [""], strict=True):
        name, _, inline = flag.partition("=")
        given = inline if "=" in flag else value
        if name.startswith("--") and name not in (*KNOBS, *LISTS, *PATHS) and "," in given:
            raise UserError(f"{name} cannot be swept; a sweep varies {', '.join(KNOBS)} (each as A,B,...)")


def train_arguments(argv: list[str]) -> list[str]:
    """The command line of ``vaelab sweep`` without the sweep's own options: what each ``vaelab
    train`` is given besides its point's values and ``--out``."""
    kept, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
            continue
        name = _option(token)
        if name in SWEEP_OPTIONS:
            skip = 0 if "=" in token else SWEEP_OPTIONS[name]
            continue
        kept.append(token)
    return kept
