"""The documentation cannot drift: every option has its help (the reference pages are generated from
them), every metric and record field is explained in the pages, and the README stays a front door."""

import argparse
import dataclasses
from pathlib import Path

from vaelab.cli import build_parser
from vaelab.config import Config
from vaelab.evaluation import Evaluation
from vaelab.runs import CSV_BASE

ROOT = Path(__file__).resolve().parent.parent
PAGES = "\n".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))


def test_every_option_of_every_command_says_what_it_does():
    for name, command in build_parser().commands.items():
        for action in command._actions:  # argparse's own list of a parser's options
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, (name, action.option_strings)


def test_every_config_field_the_user_sets_has_its_help():
    for f in dataclasses.fields(Config):
        assert "help" in f.metadata or f.name in ("classes",), f.name  # classes: set from the data's labels


def test_every_metrics_column_and_evaluation_field_is_explained_in_the_pages():
    """Beyond the generated lists (made when the site is built): each name is written in a page's prose."""
    unexplained = [
        name for name in [*CSV_BASE, *(f.name for f in dataclasses.fields(Evaluation))] if f"`{name}`" not in PAGES
    ]
    assert not unexplained, unexplained


def test_the_readme_is_a_front_door_and_its_links_lead_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert readme.splitlines()[3:5] == ["make demo", "make test"]
    for target in [part.split(")")[0] for part in readme.split("](")[1:]]:
        assert (ROOT / target.split("#")[0]).exists(), target
