"""``python -m longnet`` runs the ``longnet`` command."""

import sys

from longnet.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
