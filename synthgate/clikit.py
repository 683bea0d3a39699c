"""The CLI habits every synthgate command shares (pre-commit style).

``main(argv=None) -> int`` per program; one small function per command; one
error handler: our errors -> one line on stderr and exit 2, a failed policy
-> 1 (returned by the command), anything unexpected -> 3 with a pointer to
a log file holding the traceback, Ctrl-C -> 130.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import SynthgateError, UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 128 + 15  # SIGTERM, handled like Ctrl-C


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C so every temporary file and folder is removed on the way out."""


def printable(text) -> str:
    """``text`` with control characters (C0, DEL, C1 -- terminal escape sequences included) made visible.

    File names come from the user's disk: a name holding ``\\x1b[2J`` or a
    newline must not clear a terminal or forge a line of output.
    """
    s = str(text)
    if not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in s):
        return s
    return "".join(c if not (ord(c) < 32 or 127 <= ord(c) < 160) else ascii(c)[1:-1] for c in s)


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def new_parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_subparsers(parser: argparse.ArgumentParser):
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    return sub


def _log_dir() -> Path:
    env = os.environ.get("SYNTHGATE_LOG_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "synthgate" / "logs"


def write_crash_log(prog: str, argv: Sequence[str]) -> Path:
    """Save the current exception's traceback; return the file's path."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = f"{prog} {__version__}\nargv: {list(argv)}\n\n{traceback.format_exc()}"
    for folder in (_log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{prog.replace(' ', '-')}-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("<unwritable>")


def run(command: Callable[[Sequence[str]], int], argv: Sequence[str] | None, prog: str) -> int:
    """Run ``command(argv)`` and map every outcome to an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .device import prefer_passive_waiting

    prefer_passive_waiting()  # before any command imports torch
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    import warnings

    try:
        with warnings.catch_warnings():
            # a reader library's own warnings (pydicom on a malformed file) would precede the one-line error
            # that names the file and the problem, and are not ours to show
            warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
            return int(command(argv) or 0)
    except SystemExit as exc:  # argparse --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except SynthgateError as exc:
        print(f"{prog}: error: {printable(exc.one_line())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        # the reader went away (e.g. `| head`); nothing to report
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:
        log = write_crash_log(prog, argv)
        msg = printable(" ".join(str(exc).split())[:200])
        print(f"{prog}: internal error: {type(exc).__name__}: {msg} (traceback in {log})", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def not_yet_available(what: str) -> int:
    raise UsageError(f"`{what}` is not yet available in synthgate {__version__}")


def emit_json(obj) -> None:
    from .fsutil import to_json

    sys.stdout.write(to_json(obj))
