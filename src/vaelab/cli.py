"""The ``vaelab`` command: parse, call the library, print. Nothing else lives here.

argparse rather than a CLI framework: it is in the standard library (``vaelab --help``
imports nothing heavy), exits with status 2 on a bad option, and ``default=SUPPRESS``
tells which options the user set, which config precedence needs (command line > TOML
file > defaults). torch is imported inside the subcommands, never at start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vaelab.errors import UserError

EXAMPLES = {
    "explain": (
        "examples:\n  vaelab explain\n  vaelab explain --latent-dim 3 --data-dim 8 --json steps.json --html steps.html"
    ),
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


# -- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    p = add("explain", "walk from D_KL[q||p(z|x)] to the ELBO and its closed form, every step checked", cmd_explain)
    p.add_argument("--seed", type=int, default=0, help="seed of the model, x and the samples (default 0)")
    p.add_argument("--latent-dim", type=positive_int, default=2, help="dimension k of z (default 2)")
    p.add_argument("--data-dim", type=positive_int, default=5, help="dimension d of x (default 5)")
    p.add_argument("--samples", type=positive_int, default=20_000, help="Monte Carlo samples (default 20000)")
    p.add_argument("--json", type=_output_path, metavar="FILE", help="write every number to this JSON file")
    p.add_argument("--html", type=_output_path, metavar="FILE", help="write a self-contained page")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"vaelab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaelab: interrupted", file=sys.stderr)
        return 130
