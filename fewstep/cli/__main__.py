"""``python -m fewstep.cli``: the ``fewstep`` command."""

import sys

from . import main

sys.exit(main())
