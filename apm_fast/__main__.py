"""``python -m apm_fast ...`` is the ``apm-fast`` command."""
import sys

from .cli import main

sys.exit(main())
