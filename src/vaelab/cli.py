"""The ``vaelab`` command: parse, call the library, print. Nothing else lives here.

argparse rather than a CLI framework: it is in the standard library (``vaelab --help``
imports nothing heavy), exits with status 2 on a bad option, and ``default=SUPPRESS``
tells which options the user set, which config precedence needs (command line > TOML
file > preset > defaults). torch is imported inside the subcommands, never at start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from vaelab.config import positive_int, seed_int
from vaelab.errors import UserError
from vaelab.sweep import PIPELINE  # (the standard library and vaelab.config only: --help stays light)

EXAMPLES = {
    "serve": "examples:\n  vaelab serve runs/mnist-5k\n  vaelab serve runs/mnist --port 8123",
    "report": (
        "examples:\n  vaelab report runs/mnist-5k\n  vaelab report runs/mnist --projection tsne --out mnist.html\n"
        "  vaelab report runs/flow --compare runs/diagonal     # the gap log p(x) - ELBO of both (evaluate both first)"
    ),
    "evaluate": (
        "examples:\n  vaelab evaluate runs/mnist-5k\n"
        "  vaelab evaluate runs/mnist --iwae-k 5000 --json eval.json --per-example test.csv\n"
        "  vaelab evaluate runs/mnist/checkpoints/last.pt --split val --iwae-k 100\n"
        "  vaelab evaluate runs/mnist-5k --gaps 200      # approximation and amortization gaps of 200 images\n"
        "  vaelab evaluate runs/mnist-5k --refine 20     # the ELBO after 20 steps of refining q per image"
    ),
    "train": (
        "examples:\n  vaelab train                                  # 5,000 MNIST digits, bundled, seconds on 2 cores\n"
        "  vaelab train --time-budget 60 --lr-schedule cosine   # one minute of training\n"
        "  vaelab train --family hierarchical --warmup linear --warmup-steps 500 --free-bits 0.1\n"
        "  vaelab train --family conditional --posterior iaf\n"
        "  vaelab train --data mnist --data-dir DIR --binarize dynamic --epochs 5\n"
        "  vaelab train --data mnist --download --likelihood continuous-bernoulli --binarize none\n"
        "  vaelab train --data images/ --model conv --latent-dim 32 --out runs/mine\n"
        "  vaelab train --config run.toml --beta 4 --warmup linear --warmup-steps 2000\n"
        "  vaelab train --out runs/mnist-5k --resume\n"
        "  torchrun --nproc-per-node 2 --max-restarts 3 -m vaelab train --out runs/big --auto-resume\n"
        "  vaelab train --preset burda2015-iwae-k5 --download      # Burda et al. 2015, full protocol\n\n"
        "Options given here override the --config file, which overrides the --preset, then the defaults.\n"
        "The resolved config is saved as RUN/config.toml."
    ),
    "sweep": (
        "examples:\n  vaelab sweep --beta 0.1,0.25,0.5,1,2,4,8 --out runs/beta --jobs 2\n"
        "  vaelab sweep --beta 0.5,1,4 --latent-dim 2,10 --epochs 50 --out runs/grid     # a grid: 6 runs\n"
        "  vaelab sweep --seed 0,1,2 --data mnist --download --out runs/seeds --print \\\n"
        f"      | {PIPELINE}      # one command per line, run as printed\n\n"
        "Any vaelab train option may follow; a run is named by its values (runs/beta/beta-0.5). Started again,\n"
        "a sweep skips its finished runs and resumes the others from their last checkpoints."
    ),
    "rd": (
        "examples:\n  vaelab rd runs/beta                       # every run in the folder of a sweep\n"
        "  vaelab rd runs/beta --figure plane.png --json plane.json\n  vaelab rd runs/a runs/b runs/c"
    ),
    "compress": (
        "examples:\n  vaelab compress runs/mnist-5k -o test.vbb\n  vaelab compress runs/mnist-5k digits.npy -o d.vbb\n"
        "  vaelab compress runs/mnist-5k -o test.vbb --particles 50 --coupled --json numbers.json"
    ),
    "explain": (
        "examples:\n  vaelab explain\n  vaelab explain --latent-dim 3 --data-dim 8 --json steps.json --html steps.html"
    ),
}


def is_rank_zero() -> bool:
    """Whether this process prints: the only one, or rank 0 of those torchrun started."""
    return os.environ.get("RANK", "0") == "0"


def _output_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if not path.parent.exists():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist; create it first")
    return path


# -- subcommands --------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    from vaelab.explain import explain, format_text
    from vaelab.fileio import atomic_write_text
    from vaelab.rundir import check_output

    for option, path, before in (("--json", args.json, ()), ("--html", args.html, (args.json,))):
        if path is not None:
            check_output(path, option, outputs=before)

    result = explain(seed=args.seed, latent_dim=args.latent_dim, data_dim=args.data_dim, samples=args.samples)
    print(format_text(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result.as_dict(), indent=1))
        print(f"\nwrote {args.json}")
    if args.html:
        from vaelab.report import explain_html

        atomic_write_text(args.html, explain_html(result))
        print(f"wrote {args.html}")
    if result.failed:
        names = "; ".join(s.name for s in result.failed)
        print(f"vaelab: identity does not hold: {names}", file=sys.stderr)
        return 1
    print("\nEvery step holds.")
    return 0


def train_config(args: argparse.Namespace):
    """The config ``vaelab train``'s options resolve to, and the names of the options the user set (on
    the command line, in the --config file or through the --preset)."""
    from vaelab.config import PRESETS, Config, read_toml, resolve

    names = {f.name for f in dataclasses.fields(Config)}  # options the user set: argparse leaves the others out
    options = {k: v for k, v in vars(args).items() if k in names}
    config = resolve(args.config, options, args.preset)
    given = {*options, *(read_toml(args.config) if args.config else ()), *(PRESETS[args.preset] if args.preset else ())}
    return config, given


def cmd_train(args: argparse.Namespace) -> int:
    from vaelab.runs import check_before_launch, summary_line, train_run

    if args.resume and args.auto_resume:
        raise UserError("--resume and --auto-resume: give one (--auto-resume also starts a run that has no checkpoint)")
    config, given = train_config(args)
    if args.nproc > 1:  # what each process would refuse, refused once, before torchrun starts them
        check_before_launch(config, args.nproc, args.out, args.resume, args.overwrite, args.auto_resume)
        return launch_torchrun(args.nproc, args.argv)
    out, test = train_run(
        config, out=args.out, resume=args.resume, overwrite=args.overwrite, auto_resume=args.auto_resume, given=given
    )
    if not is_rank_zero():
        return 0
    print(summary_line(test))
    if len(test.kl_per_layer) > 1:
        from vaelab.objectives import collapse_warning, collapsed_layers

        for layer in collapsed_layers(test.kl_per_layer):
            print(collapse_warning(layer, test.kl_per_layer[layer]))
    print(f"results in {out}/ (metrics.csv, config.toml, model.safetensors, checkpoints/, tensorboard/)")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the run's ``finally`` writes the
    pending checkpoint, and the command exits with 143 (128 + SIGTERM), as a process killed by it does."""


def _terminate(signum, frame):
    raise Terminated()


def stop_on_sigterm():
    """SIGTERM (kill, docker stop, Slurm preemption, torchrun) stops the block as Ctrl-C does: a run writes
    its pending checkpoint, a file being written is removed, and the command exits with 143."""
    return _handled(_terminate, signal.SIGTERM)


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``vaelab CMD --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m vaelab CMD ...``;
    ``argv`` is the command line given to :func:`main`, without the program name."""
    rest = []
    i = 0
    while i < len(argv):  # drop --nproc N and --nproc=N, keep everything else
        if argv[i] == "--nproc":
            i += 2
            continue
        if not argv[i].startswith("--nproc="):
            rest.append(argv[i])
        i += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "vaelab"]
    # torchrun stops its processes on a signal and waits for them: SIGTERM, sent to this process alone (kill,
    # docker stop), is passed on, once; Ctrl-C reaches torchrun and its processes from the terminal itself. Either
    # way this process waits for torchrun, so that nothing of the run goes on after it has ended
    told: list[int] = []
    with _handled(lambda signum, frame: told.append(signum), signal.SIGINT, signal.SIGTERM):
        proc, passed_on = subprocess.Popen([*cmd, *rest]), False
        while (code := proc.poll()) is None:
            if signal.SIGTERM in told and not passed_on:
                proc.send_signal(signal.SIGTERM)
                passed_on = True
            time.sleep(0.1)
    if told and code != 0:  # torchrun ends with 1 when a signal stops it; say which, as a single process does
        raise Terminated() if signal.SIGTERM in told else KeyboardInterrupt()
    return code


@contextlib.contextmanager
def _handled(handler, *signals: int):
    """``handler`` for ``signals`` in the ``with`` block; outside the main thread (which alone takes signals)
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """``vaelab train``'s options: one per field of ``Config`` that declares one (``config.opt``: its help,
    group, choices and least value), then the run's own options."""
    from vaelab.config import OPTION_GROUPS, PRESETS, Config, choices_of, help_of, option_parser

    groups = {name: p.add_argument_group(name) for name in OPTION_GROUPS}
    S = argparse.SUPPRESS  # unset options stay out of the namespace, so the --config file can supply them
    for f in dataclasses.fields(Config):
        if "help" not in f.metadata:
            continue  # set by vaelab itself (classes)
        flag, g = "--" + f.name.replace("_", "-"), groups[f.metadata["group"]]
        if f.type == "bool":
            g.add_argument(flag, dest=f.name, action="store_true", default=S, help=help_of(f))
            continue
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kw = {"choices": choices_of(f)} if choices_of(f) else {"type": option_parser(f)}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        g.add_argument(flag, dest=f.name, default=S, help=f"{help_of(f)} (default: {shown})", **kw)
    groups["model"].add_argument("--conditional", action=Renamed, nargs=0, const="--family conditional", help=S)
    g = groups["run"]
    g.add_argument("--config", metavar="FILE", help="a TOML file with any of the options above")
    g.add_argument("--preset", choices=PRESETS, help="a published protocol: " + ", ".join(PRESETS))
    g.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: runs/DATA, never an existing one)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    g.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from --out's checkpoints/last.pt if it exists, else start the run: the same command "
        "restarted (torchrun --max-restarts, a scheduler) loses at most --checkpoint-every seconds or the epoch in "
        "progress",
    )
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        metavar="N",
        help="train with N processes on this machine through torchrun (DistributedDataParallel)",
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        from vaelab.distributed import resolve_device

        resolve_device(args.device)  # refused once, before torchrun starts the processes
        if args.gaps is not None or args.refine is not None:
            raise UserError(f"{'--gaps' if args.gaps else '--refine'} runs in one process; drop --nproc")
        return launch_torchrun(args.nproc, args.argv)
    from vaelab.evaluation import evaluate_run, format_table
    from vaelab.fileio import atomic_write_text
    from vaelab.rundir import check_output

    for option, path, may_be, before in (
        ("--json", args.json, "evaluation.json", ()),
        ("--per-example", args.per_example, None, (args.json,)),
    ):
        if path is not None:
            check_output(path, option, also=(args.run,), may_be=may_be, outputs=before)

    record, per_example_csv = evaluate_run(
        args.run,
        data=args.data,
        data_dir=args.data_dir,
        split=args.split,
        iwae_k=args.iwae_k,
        batch_size=args.batch_size,
        seed=args.seed,
        per_example=args.per_example is not None,
        device=args.device,
        gaps=args.gaps,
        refine=args.refine,
    )
    if not is_rank_zero():
        return 0
    print(f"{record.data} ({record.split}, {record.examples} examples, binarize {record.binarize}, seed {record.seed})")
    print(format_table(record))
    text = json.dumps(record.to_dict(), indent=1)
    if args.json:
        atomic_write_text(args.json, text)
        print(f"wrote {args.json}")
    if per_example_csv is not None:
        atomic_write_text(args.per_example, per_example_csv)
        print(f"wrote {args.per_example}")
    return 0


def is_folder_of_runs(path: Path) -> bool:
    """A folder that is not itself a run (no weights, no config): a sweep's, say."""
    return path.is_dir() and not (path / "model.safetensors").exists() and not (path / "config.toml").exists()


def cmd_report(args: argparse.Namespace) -> int:
    from vaelab.report import run_report, runs_report

    if is_folder_of_runs(args.run):
        print(f"wrote {runs_report(args.run, args.out)}")  # their rate-distortion plane
        return 0
    out, figures = run_report(args.run, out=args.out, projection=args.projection, compare=args.compare)
    print(f"wrote {out} and {len(figures)} figures in {figures[0].parent}/")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vaelab.web.app import create_app, create_runs_app

    with socket.socket() as probe:  # say a taken port in one line, before loading the model
        # as uvicorn binds: a port whose last connections wait out TCP's TIME_WAIT is free to listen on
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise UserError(
                f"cannot listen on {args.host}:{args.port} ({err.strerror}); choose another --port"
            ) from None
    app = (create_runs_app if is_folder_of_runs(args.run) else create_app)(args.run, host=args.host)
    print(f"vaelab: serving {args.run} on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from vaelab.compress import compress, format_summary
    from vaelab.fileio import atomic_write_text
    from vaelab.rundir import check_output

    check_output(args.output, "-o", also=tuple(p for p in (args.run, args.images) if p is not None))
    if args.json is not None:
        check_output(
            args.json, "--json", also=tuple(p for p in (args.run, args.images) if p is not None), outputs=(args.output,)
        )
    summary = compress(
        args.run,
        args.output,
        images=args.images,
        split=args.split,
        latent_bits=args.latent_bits,
        particles=args.particles,
        seed=args.seed,
        iwae_k=args.iwae_k,
        overwrite=args.overwrite,
        order=args.order,
        coupled=args.coupled,
    )
    print(
        f"wrote {args.output}: lossless (checked by decoding it), {summary['encode_seconds']:.2f} s to encode, "
        f"{summary['decode_seconds']:.2f} s to decode"
    )
    print(format_summary(summary))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from vaelab.compress import decompress
    from vaelab.rundir import check_output

    check_output(args.output, "-o", also=(args.file,))
    done = decompress(args.file, args.output, run=args.run, overwrite=args.overwrite)
    print(
        f"wrote {done['images']} images to {done['file']} ({done['decode_seconds']:.2f} s to decode), exactly as coded"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vaelab.sweep import KNOBS, command_line, parse_values, plan, run_sweep, threads_per_job, train_arguments

    given = {flag: getattr(args, flag.lstrip("-").replace("-", "_"), None) for flag in KNOBS}
    knobs = {flag: parse_values(flag, text) for flag, text in given.items() if text is not None}
    if not knobs:
        raise UserError("a sweep needs values of at least one knob: " + ", ".join(f"{k} A,B,..." for k in KNOBS))
    for flag in ("resume", "auto_resume", "overwrite"):
        if getattr(args, flag, False):
            raise UserError(
                f"--{flag.replace('_', '-')}: a sweep resumes its unfinished runs and skips its finished ones itself; "
                "delete a run's folder to train it again"
            )
    if getattr(args, "nproc", 1) > 1:
        raise UserError("--nproc: a sweep runs whole trainings side by side; use --jobs N")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give the folder for the sweep's runs")
    threads = None if hasattr(args, "threads") else threads_per_job(args.jobs)
    points = plan(knobs, train_arguments(args.argv[1:]), args.out, threads)
    parser = build_parser()  # each point's config, as its vaelab train resolves it: a run there must be of it
    configs = {p.out: train_config(parser.parse_args(p.argv))[0] for p in points}
    if args.print:
        print("\n".join(command_line(p) for p in points))
        return 0
    from vaelab.rundir import folder_lock
    from vaelab.runs import make_dir

    make_dir(args.out)  # (its message says "run directory": the sweep's folder is made the same way)
    with folder_lock(args.out, "vaelab sweep"):  # a second sweep into the folder is refused at once
        print(f"vaelab sweep: {len(points)} runs into {args.out}/, {args.jobs} at a time")
        outcome = run_sweep(points, args.jobs, configs)
    failed = [p for p, what in outcome if what.startswith("failed")]
    if failed:
        print(f"vaelab sweep: {len(failed)} of {len(points)} runs failed; run the sweep again to retry them")
        return 1
    print(f"all {len(points)} runs finished in {args.out}/; the rate-distortion plane: vaelab rd {args.out}")
    return 0


def cmd_rd(args: argparse.Namespace) -> int:
    from vaelab import plots
    from vaelab.fileio import atomic_write_bytes, atomic_write_text
    from vaelab.rd import figure, format_table, plane
    from vaelab.rundir import check_output

    for option, path, before in (("--json", args.json, ()), ("--figure", args.figure, (args.json,))):
        if path is not None:
            check_output(path, option, outputs=before)
    points = plane(args.runs)
    print(format_table(points))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps([p.to_dict() for p in points], indent=1))
        print(f"wrote {args.json}")
    if args.figure is not None:
        atomic_write_bytes(args.figure, plots.to_png_bytes(figure(points)))
        print(f"wrote {args.figure}")
    return 0


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


# -- parser -------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse, with a usage error said on one line that points at --help."""

    def error(self, message: str):
        self.exit(2, f"vaelab: error: {message}; see '{self.prog} --help'\n")


class Renamed(argparse.Action):
    """An option that vaelab has renamed (``const``): a usage error that names the new spelling."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.const}; use that")


def _explain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the model, x and the samples (default 0)")
    p.add_argument("--latent-dim", type=positive_int, default=2, help="dimension k of z (default 2)")
    p.add_argument("--data-dim", type=positive_int, default=5, help="dimension d of x (default 5)")
    p.add_argument("--samples", type=positive_int, default=20_000, help="Monte Carlo samples (default 20000)")
    p.add_argument("--json", type=_output_path, metavar="FILE", help="write every number to this JSON file")
    p.add_argument("--html", type=_output_path, metavar="FILE", help="write a self-contained page")


def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False  # the train options pass through to vaelab train as they were typed
    p.conflict_handler = "resolve"  # the knobs below take lists where train takes one value
    add_train_options(p)
    from vaelab.sweep import KNOBS

    g = p.add_argument_group("the sweep")
    for flag, (_, what) in KNOBS.items():
        g.add_argument(flag, metavar="A,B,...", help=f"values to sweep, {what}")
    g.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder of the sweep's run directories")
    g.add_argument(
        "--jobs", type=positive_int, default=1, metavar="N", help="runs side by side, cores divided (default 1)"
    )
    g.add_argument("--print", action="store_true", help="write the vaelab train command lines instead, one per line")


def _rd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_OR_DIR", help="run directories, or folders of runs")
    p.add_argument("--json", type=_output_path, metavar="FILE", help="every point as JSON")
    p.add_argument("--figure", type=_output_path, metavar="FILE.png", help="draw the plane into this PNG")


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN", help="a run directory, or a checkpoint / model.safetensors file")
    p.add_argument("--data", metavar="NAME", help="data set (default: the run's)")
    p.add_argument("--data-dir", metavar="DIR", help="folder of the data set's files (default: the run's)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="which split (default: test)")
    p.add_argument(
        "--iwae-k",
        type=int,
        default=5000,
        metavar="K",
        help="importance samples for log p(x); 0 skips it (default: 5000)",
    )
    p.add_argument("--batch-size", type=positive_int, default=100, help="examples per IWAE batch (default: 100)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to evaluate: auto, a CUDA GPU where PyTorch sees one (default), cpu or cuda",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of every sample drawn (default: 0)")
    p.add_argument(
        "--json", type=_output_path, metavar="FILE", help="write the record as JSON (also RUN/evaluation.json)"
    )
    p.add_argument("--per-example", type=_output_path, metavar="FILE.csv", help="per-example ELBO, reconstruction, KL")
    p.add_argument(
        "--gaps",
        type=positive_int,
        metavar="N",
        help="the posterior gap of the split's first N images in two: approximation (the best q of the run's "
        "family for each image, q*, against log p(x)) and amortization (the encoder's q against q*)",
    )
    p.add_argument(
        "--refine",
        type=positive_int,
        metavar="K",
        help="the ELBO after K steps of optimising q per image from the encoder's output (test-time, semi-amortized "
        "inference), beside the encoder's, with the gain and its cost",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        metavar="N",
        help="share the IWAE estimate across N processes on this machine (torchrun)",
    )


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        type=Path,
        metavar="RUN",
        help="a run directory, or a folder of runs (a sweep's): their rate-distortion plane",
    )
    p.add_argument(
        "--out",
        type=_output_path,
        metavar="FILE",
        help="the HTML file (default: RUN/report.html; a folder of runs: needed)",
    )
    p.add_argument(
        "--projection",
        choices=("pca", "tsne"),
        default="pca",
        help="how to draw a latent space of more than 2 dimensions (default: pca)",
    )
    p.add_argument(
        "--compare",
        type=Path,
        metavar="RUN",
        help="another run on the same data: a table of both runs' ELBO, log p(x) and the gap between them",
    )


def _compress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, metavar="RUN", help="a run directory, or a checkpoint / model.safetensors file")
    p.add_argument(
        "images",
        type=Path,
        metavar="IMAGES",
        nargs="?",
        help="a .npy/.npz file, a folder of images or an IDX file (default: the run's --split, as the model sees it)",
    )
    p.add_argument("-o", "--output", type=_output_path, required=True, metavar="FILE", help="the compressed file")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="without IMAGES (default: test)")
    p.add_argument(
        "--latent-bits",
        type=positive_int,
        metavar="B",
        help="2^B buckets of equal prior mass per latent dimension, 1 to 16 (default: 8); a categorical z is coded "
        "as its categories",
    )
    p.add_argument(
        "--particles",
        type=positive_int,
        default=1,
        metavar="K",
        help="1: BB-ANS, whose limit is -ELBO; K > 1: BB-IS with K importance samples, whose limit is the "
        "IWAE-K bound, for more initial bits (default: 1)",
    )
    p.add_argument(
        "--coupled",
        action="store_true",
        help="with --particles K: the K particles from one popped uniform (McBits' BB-CIS), so the first image "
        "needs one particle's initial bits, not K",
    )
    p.add_argument(
        "--order",
        choices=("bit-swap", "bb-ans"),
        help="two latent layers: bit-swap pops z2 after pushing x, so fewer initial bits (needs --inference "
        "bottom-up, where it is the default); bb-ans pops both first (the default elsewhere)",
    )
    p.add_argument(
        "--iwae-k", type=int, default=1000, metavar="K", help="samples for -log2 p(x) beside the code; 0 skips it"
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the initial bits and of the estimates (default: 0)"
    )
    p.add_argument("--json", type=_output_path, metavar="FILE", help="every number, per image too, as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")


def _decompress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, metavar="FILE", help="a file vaelab compress wrote")
    p.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT", help="a .npy file, or a folder for PNG files"
    )
    p.add_argument("--run", type=Path, metavar="RUN", help="the run it was coded with (default: the one it names)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (the .npy, or the PNGs in the folder)")


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", type=Path, metavar="RUN", help="a run directory, or a folder of runs: their rate-distortion plane"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vaelab",
        description="Variational autoencoders with every term of the objective explicit and checked.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    _explain_options(
        add("explain", "walk from D_KL[q||p(z|x)] to the ELBO and its closed form, every step checked", cmd_explain)
    )
    add_train_options(
        add("train", "train a VAE and log the ELBO's terms (default: 5,000 bundled MNIST digits)", cmd_train)
    )
    _sweep_options(
        add("sweep", "train one run per value of a knob (or per point of a grid), --jobs at a time", cmd_sweep)
    )
    _rd_options(add("rd", "runs on the rate-distortion plane: rate R (the KL term) against distortion D", cmd_rd))
    _evaluate_options(
        add("evaluate", "ELBO terms, IWAE log-likelihood, active units and the KL split of a trained run", cmd_evaluate)
    )
    _report_options(add("report", "a self-contained HTML report of a run, with its figures as PNG files", cmd_report))
    _compress_options(
        add("compress", "code images losslessly with a run's model by bits-back: the KL term as bits", cmd_compress)
    )
    _decompress_options(
        add("decompress", "the images of a file vaelab compress wrote, exactly as they were", cmd_decompress)
    )
    _serve_options(add("serve", "a local web page: KL explorer, image inspector, latent explorer", cmd_serve))
    parser.commands = sub.choices  # each command's parser, by name (the generated reference reads them)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:
        from vaelab.sweep import check_sweepable

        try:
            check_sweepable(argv[1:])
        except UserError as err:
            print(f"vaelab: error: {err}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    args.argv = argv  # --nproc runs the same command line again under torchrun
    try:
        with stop_on_sigterm():  # every command: its partial outputs go, as on Ctrl-C
            return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        if is_rank_zero():  # under torchrun, say it once
            print(f"vaelab: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head and the like
        return 0
    except KeyboardInterrupt as stop:
        print("vaelab: stopped by SIGTERM" if isinstance(stop, Terminated) else "vaelab: interrupted", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
