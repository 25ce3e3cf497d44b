#!/usr/bin/env bash
# Build the plugin's release ZIP: dist/casd_scene_classifier-<version>.zip, checked as
# plugins.qgis.org checks uploads. Install it in QGIS with
# Plugins > Manage and Install Plugins > Install from ZIP.
#
#   bash scripts/package_plugin.sh [--out DIR] [--check-urls]
#
# The work is done by scripts/package_plugin.py (standard library only); see its docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" scripts/package_plugin.py "$@"
