"""What the command-line tools share: their --help and their usage errors."""

import argparse


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
