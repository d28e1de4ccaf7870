"""Ray job entry point: `ray job submit -- python jobs/import.py --config FILE [key=value ...]`."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the repo root is the cwd but not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2v.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["import", *sys.argv[1:]]))
