"""`convattn-export`'s entry point: Ctrl-C and SIGTERM are handled from the first instant.

Importing the CLI (typer, rich, then torch) takes a while; a signal in that time would print a
traceback (SIGINT) or leave the default exit status (SIGTERM). Until the CLI installs its own
handlers, nothing has been written, so a signal ends the process with one line and the documented
code: 130 or 143.
"""

import os
import signal
import sys


def _quit(signum, frame):
    code, word = (130, "interrupted") if signum == signal.SIGINT else (143, "terminated")
    sys.stderr.write(f"{word}: no partial output was written\n")
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    signal.signal(signal.SIGINT, _quit)
    signal.signal(signal.SIGTERM, _quit)
    from convattn.exporter.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
