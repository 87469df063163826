"""``python -m koopnet`` (and ``torchrun -m koopnet``) runs the command-line interface."""

import sys

from koopnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
