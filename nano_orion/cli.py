"""What the command-line tools share: their --help, their usage errors, their --threads default."""

import argparse
import os

THREADS_HELP = (
    "torch's CPU threads (torch.set_num_threads): half the CPUs, at most 4, unless given, which keeps "
    "steps steady when other work shares the machine, where torch's own choice (one per CPU) can make "
    "them stall"
)


def default_threads() -> int:
    """Half the CPUs this process may use, at most 4, at least 1. torch's default, one thread per
    CPU, is fastest on an idle machine, but each step waits for its slowest thread: where other
    work holds some CPUs, steps then take several times longer (4x measured on 2 busy cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


class UsageError(Exception):
    """A problem with the command line or the files it names; the tool prints it as its one-line
    usage error (ArgumentParser.error)."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error is one line on stderr (--help shows the usage), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the line breaks of the description and epilog (the scripts' docstrings), and
    each flag's help ends with its default, except where the default says nothing: None (the
    help says it in words), a switch's False, a repeatable flag's empty list. A list is shown
    as it is typed: 4096 8192."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == []:
            return action.help
        if isinstance(default, list):
            return f"{action.help} (default: {' '.join(map(str, default))})"
        return super()._get_help_string(action)
