"""`python -m t2v COMMAND ...`: the `t2v` command, for environments without the script on PATH
(e.g. `ray job submit -- python -m t2v render ...`)."""

import sys

from t2v.cli import main

sys.exit(main())
