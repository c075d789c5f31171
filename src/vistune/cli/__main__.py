"""``python -m vistune.cli``."""
import sys

from . import main

sys.exit(main())
