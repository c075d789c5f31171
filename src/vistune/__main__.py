"""``python -m vistune`` (and ``torchrun … -m vistune train …``): the ``vistune`` command."""
import sys

from .cli import main

sys.exit(main())
