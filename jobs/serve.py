"""Ray job entry point: `ray job submit -- python jobs/serve.py --config FILE [key=value ...]`.

Deploys the online API on the cluster (give `blocking=false` to deploy and end the job; the
Serve application stays). A Serve config file for `serve deploy`, or a KubeRay RayService,
names `import_path: t2v.serve.app:app_builder` with the ServeConfig keys as `args` instead (the
`serveConfigV2` of cluster/kuberay/rayservice.yaml is such a file).
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the repo root is the cwd but not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2v.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
