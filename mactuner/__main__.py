"""``python -m mactuner …``: see :mod:`mactuner.cli`."""

import sys

from mactuner.cli import main

sys.exit(main())
