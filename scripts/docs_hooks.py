"""MkDocs hooks: the reference pages that are generated from the code, so that they cannot drift.

``<!-- vaelab: commands -->`` becomes every command's ``--help`` (argparse's own text: every option with
its default and choices); ``<!-- vaelab: config -->`` a table of every ``Config`` field (its TOML key,
default and help); ``<!-- vaelab: evaluation -->`` the fields of ``evaluation.json``; ``<!-- vaelab:
metrics -->`` the columns of ``metrics.csv``.
"""

from __future__ import annotations

import dataclasses
import os


def _commands() -> str:
    from vaelab.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps its help to the terminal's width
    parser = build_parser()
    parts = [f"```text\n{parser.format_help()}```\n"]
    for name, command in parser.commands.items():
        parts.append(f"## vaelab {name}\n\n```text\n{command.format_help()}```\n")
    return "\n".join(parts)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _config() -> str:
    from vaelab.config import Config, help_of

    rows = ["| key | default | what it sets |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        if "help" not in f.metadata:
            continue
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        rows.append(f"| `{f.name}` | `{_cell(default)}` | {_cell(help_of(f))} |")
    return "\n".join(rows) + "\n"


def _evaluation() -> str:
    from vaelab.evaluation import Evaluation

    return ", ".join(f"`{f.name}`" for f in dataclasses.fields(Evaluation)) + "\n"


def _metrics() -> str:
    from vaelab.runs import CSV_BASE

    return ", ".join(f"`{c}`" for c in CSV_BASE) + ", then the KL per layer and per dimension\n"


GENERATED = {
    "<!-- vaelab: commands -->": _commands,
    "<!-- vaelab: config -->": _config,
    "<!-- vaelab: evaluation -->": _evaluation,
    "<!-- vaelab: metrics -->": _metrics,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
