#!/usr/bin/env bash
# A local S3-compatible endpoint for development: moto in server mode on 127.0.0.1.
#   source <(infra/dev/s3.sh env)   # export AWS_* for t2v in this shell
#   infra/dev/s3.sh start            # serve on 127.0.0.1:${T2V_S3_PORT:-9000} (foreground)
# The tests start their own server on a free port; this is for trying `s3://` URIs by hand.
set -euo pipefail
port="${T2V_S3_PORT:-9000}"
case "${1:-start}" in
  env)
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:${port}"
    echo "export AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev AWS_DEFAULT_REGION=us-east-1"
    ;;
  start)
    here="$(cd "$(dirname "$0")/../.." && pwd)"
    exec "${here}/.venv/bin/moto_server" -H 127.0.0.1 -p "${port}"
    ;;
  *) echo "usage: $0 {env|start}" >&2; exit 2 ;;
esac
