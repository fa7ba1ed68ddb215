#!/usr/bin/env bash
# Runs the MQTT 3.1.1 / 5.0 conformance suite against a broker.
#   tests/conformance/run.sh [--broker corvid|mosquitto] [pytest args...]
# The venv lives outside the repo; mosquitto (the reference broker) is installed if missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${HOME}/.cache/corvid/venv"

broker=corvid
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --broker) broker="$2"; shift 2 ;;
    --broker=*) broker="${1#--broker=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ ! -x "${venv}/bin/python" ]]; then
  python3 -m venv "${venv}"
fi
"${venv}/bin/pip" install -q --disable-pip-version-check -r "${here}/requirements.txt"

if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto
fi

cd "${here}"
exec "${venv}/bin/python" -m pytest -p no:cacheprovider --broker "${broker}" "${args[@]}"
