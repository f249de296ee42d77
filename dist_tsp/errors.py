"""The base of every error a user can fix: printed as one line, without a traceback; and what each way a run ends
exits with."""

import argparse
import contextlib
import errno
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn


class UserError(ValueError):
    """Bad input (config, data, checkpoint, launch shape), with a message naming the fix."""

    exit_code = 2  # as argparse's: a command that can never work as given


def bad_option(message: str) -> NoReturn:
    """An unknown or malformed option, as argparse words it: a UserError (one line, exit 2, like every other bad
    input, said where the command says its errors), not argparse's usage and two lines."""
    raise UserError(f"{message}: see --help")


class ArgumentParser(argparse.ArgumentParser):
    """A command's options, a bad one a UserError (bad_option)."""

    def error(self, message: str) -> NoReturn:
        bad_option(message)


def folder_argument(text: str) -> Path:
    """An option's folder: an empty one (an unset variable, `--out "$OUT"`) is refused, not taken for the current
    directory."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: give a folder")
    return Path(text)


class SharedUserError(UserError):
    """Bad input that every rank meets, or has been told of: said once, by rank 0."""


class OutOfSpace(OSError):
    """A file that could not be written because its file system is full or this user's quota there is spent: said
    in one line; once there is room, a rerun resumes from the last complete checkpoint."""

    exit_code = 1  # as a data loader worker killed for memory: the machine's limit, not the command's input


def space_ran_out(error: BaseException | None) -> OSError | None:
    """The OSError behind `error` that says the file system is full or the quota spent, if any: torch.save raises
    its own RuntimeError ("unexpected pos ...") in the context of the file's OSError."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def not_a_file(path: Path) -> str:
    """What `path`, given as a file but not a regular one, is instead, for a one-line error: "is a directory",
    "is not a regular file" (a device, a pipe) or "does not exist"."""
    return "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"


class RunStopped(Exception):
    """The run stopped on purpose at a step boundary; `exit_code` tells a scheduler what happened."""

    exit_code = 1


class Preempted(RunStopped):
    """SIGTERM or SIGUSR1: a checkpoint was written; rerun the same command to resume."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class NonFiniteLoss(RunStopped):
    """A NaN or inf loss: stopped before any checkpoint could hold the damage."""

    exit_code = 3


INTERRUPTED = ("interrupted (Ctrl-C): the steps since the last checkpoint are lost; rerun the same command to resume "
               "from it (SIGTERM or SIGUSR1 stop after the next step with a checkpoint)")
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


@contextlib.contextmanager
def exits_in_one_line(prog: str, interrupted: str) -> Iterator[None]:
    """A command's body: bad input ends it with `prog: error: ...` and exit 2 (a full disk: exit 1), Ctrl-C with
    `prog: interrupted` and exit 130."""
    try:
        yield
    except (UserError, OutOfSpace) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
