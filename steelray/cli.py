"""The command line every ``jobs/*.py`` shares: ``--config`` YAML plus ``key=value`` overrides, read
by ``config.load`` (the same checks and messages everywhere), and its exit codes in ``--help``."""

from __future__ import annotations

import argparse
import logging

from steelray import config

DONE, FAILED, BAD_ARGUMENTS, BUSY, ALERT = 0, 1, 2, 3, 4


def parser(doc: str, exit_codes: dict[int, str], config_required: bool = False,
           config_help: str = "YAML config (see jobs/configs/)") -> argparse.ArgumentParser:
    """An argument parser with the job's docstring, ``--config``, the overrides, and the exit codes
    listed under the options."""
    epilog = "exit status:\n" + "\n".join(f"  {code}  {what}" for code, what in sorted(exit_codes.items()))
    p = argparse.ArgumentParser(description=doc, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=config_required, help=config_help)
    p.add_argument("overrides", nargs="*", help="key.sub=value settings over the config, e.g. train.lr=3e-4")
    return p


def load(args: argparse.Namespace, cls: type, flags: list[str] = ()):
    """The job's config from ``--config``, then ``flags`` (what the job's own options set), then the
    overrides: raises ``config.ConfigError`` naming the key and what is valid."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return config.load(args.config, [*flags, *args.overrides], cls)
