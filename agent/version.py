"""The version every command and agent reports: the installed distribution's. No typing import:
migctl-delta's start-up is measured (agent/delta)."""

from __future__ import annotations

import argparse
import sys

PROTOCOL_VERSION = 3
"""Raised whenever agents of the old and the new code could not migrate between them (2:
Vouch answers only the keys it is asked about, and cached items carry their entitled nodes;
3: a final checkpoint may keep the TCP connections, which an older source would close)."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("migctl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


class VersionAction(argparse.Action):
    """`--version`, read only when asked (the metadata costs every command's start-up)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0,
                         help="print the version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"{parser.prog} {version()}")
        sys.exit(0)
