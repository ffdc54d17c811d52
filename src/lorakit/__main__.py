"""``python -m lorakit`` is the ``lorakit`` command (torchrun launches it this way)."""

import sys

from lorakit.cli import main

sys.exit(main())
