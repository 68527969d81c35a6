"""``python -m producer.cli``: the ``mmq`` command."""

import sys

from producer.cli.mmq import main

sys.exit(main())
