"""``python -m magnet_zoo`` is ``magnet-zoo``."""

import sys

from magnet_zoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
