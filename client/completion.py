"""What an argument completes to, marked as a name (FILE, DIRECTORY) and turned into shtab's
completers only by `migctl completion`: importing shtab costs every other command ~60 ms."""

from __future__ import annotations

import argparse

FILE = "FILE"
DIRECTORY = "DIRECTORY"


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """PARSER's completion script for SHELL, its marked arguments completing as marked."""
    import shtab

    def resolve(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(getattr(action, "complete", None), str):
                action.complete = getattr(shtab, action.complete)  # type: ignore[attr-defined]
            if isinstance(action, argparse._SubParsersAction):
                for sub in set(action.choices.values()):
                    resolve(sub)

    resolve(parser)
    return shtab.complete(parser, shell=shell)
