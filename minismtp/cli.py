"""The `minismtp` command: serve, check-config, stats, --version.

Untrusted input: command-line arguments and the configuration file, both validated by
`config.load_config` (`stats`: `config.load_stats_config`, which reads only what it needs);
every problem is printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys

from minismtp import __version__, exitcodes
from minismtp.config import ConfigError, dump_config, load_config, load_stats_config
from minismtp.logsetup import setup_logging
from minismtp.logstream import log_handler
from minismtp.signals import HELD_AT_START


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minismtp", description="A fast, pre-forked SMTP receiver.")
    parser.add_argument("--version", action="version", version=f"minismtp {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server (master and workers)")
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    serve.add_argument("--listen", metavar="HOST:PORT", action="append",
                       help="listen here instead of server.listen (repeatable)")
    serve.add_argument("--workers", metavar="N", help="worker count (an integer or auto)")
    check = commands.add_parser("check-config",
                                help="validate a configuration and print the effective one")
    check.add_argument("--config", metavar="FILE", help="YAML configuration file")
    stats = commands.add_parser("stats", help="show a running server's totals and rates")
    stats.add_argument("--config", metavar="FILE", help="YAML configuration file")
    stats.add_argument("--once", action="store_true",
                       help="print once and exit (the default when not on a terminal)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if getattr(args, "listen", None):
        overrides["server.listen"] = args.listen
    if getattr(args, "workers", None) is not None:
        # Passed as text: the setting's parser takes ASCII digits only ("²" passes
        # str.isdigit() but not int()), and names the key when it refuses.
        overrides["server.workers"] = args.workers
    return overrides


def main(argv: list[str] | None = None) -> int:
    _open_standard_descriptors()
    _escape_the_unencodable()
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader of our output went away (`check-config | head`): nothing to say to
        # it; stdout onto /dev/null, so that the interpreter's exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exitcodes.FAILURE
    except OSError as exc:
        if exc.filename is not None:
            raise  # not a write to a standard stream: a bug, shown as one
        print(f"minismtp: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return exitcodes.FAILURE


def _open_standard_descriptors() -> None:
    """Started with stdin, stdout or stderr closed (`2>&-`), /dev/null takes its place:
    else the next file opened would get the number, and what is written to it (the
    log, a fatal error's traceback) would land in that file, and workers, finding no
    sys.stderr, would fail to start."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDONLY if mode == "r" else os.O_WRONLY)
            if opened != fd:  # lower ones are open, so this one is the lowest free
                os.dup2(opened, fd)
                os.close(opened)
        if getattr(sys, name) is None:
            setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, mode, closefd=False),
                                                write_through=mode == "w"))


def _escape_the_unencodable() -> None:
    """Under an ASCII locale (LC_ALL=C without UTF-8 mode, PYTHONIOENCODING=ascii) a
    character stdout cannot encode, in a path or a pattern the output quotes, ended the
    command in a traceback: such characters are written as backslash escapes instead.
    (The effective configuration escapes them itself, in YAML's way.)"""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return exitcodes.CONFIG
    if args.command == "stats":
        return _stats(args)
    serving = args.command == "serve"
    if serving:
        # Until the master's handlers are in place (arbiter.py), a TTIN would stop us
        # and a HUP end us: blocked, they wait for the handlers. A stop ends the start
        # at once, Ctrl-C too (as SIG_DFL, without a KeyboardInterrupt's traceback).
        interrupt = signal.signal(signal.SIGINT, signal.SIG_DFL)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)
    overrides = _overrides(args)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        if serving:  # no master to take them: as they were
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            signal.signal(signal.SIGINT, interrupt)
        _report(exc.problems)
        return exitcodes.CONFIG
    if args.command == "check-config":
        from minismtp.startup import delivery_problems, delivery_warnings

        problems = delivery_problems(config)
        for problem in problems:
            print(f"minismtp: {problem}", file=sys.stderr)
        if problems:
            return exitcodes.CONFIG
        for warning in [*config.warnings, *delivery_warnings(config)]:
            print(f"minismtp: warning: {warning}", file=sys.stderr)
        sys.stdout.write(dump_config(config))
        return exitcodes.OK
    setup_logging(config.logging.level, config.logging.format)
    for warning in config.warnings:
        logging.getLogger("minismtp.master").warning("%s", warning)
    from minismtp.arbiter import Arbiter  # the server's modules only when serving

    try:
        return Arbiter(config, args.config, overrides).run()
    finally:
        if (handler := log_handler()) is not None:
            handler.drain()  # what a stalled log stream still holds: a second at most


def _stats(args: argparse.Namespace) -> int:
    # The stats section only: the server's TLS keys and users files are often readable by
    # the server alone, and an operator watching it need not be able to read them.
    from minismtp import statsview

    try:
        config = load_stats_config(args.config)
    except ConfigError as exc:
        _report(exc.problems)
        return exitcodes.CONFIG
    return statsview.run(config, args.config, args.once)


def _report(problems: list[str]) -> None:
    for problem in problems:
        print(f"minismtp: {problem}", file=sys.stderr)
