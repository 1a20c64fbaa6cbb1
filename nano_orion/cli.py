"""What the command-line tools (generate.py, train.py) share: a usage error is one line."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error is one line on stderr (--help shows the usage), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")
