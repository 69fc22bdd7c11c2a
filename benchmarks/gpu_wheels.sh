#!/usr/bin/env bash
# Wheels for the packages a GPU machine's image lacks (it has torch and timm, not Ray), built here into
# .whl/ at the repository root (git-ignored), small enough to travel with the working tree (64 MiB):
# Ray is repacked without its Java jars, RLlib and the dashboard's web build, LZMA-compressed.
# Usage: bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   (the GPU image's Python; default 3.12)
# Then on the GPU machine: bash benchmarks/on_gpu.sh COMMAND...  (installs them and runs COMMAND)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pyver=${1:-3.12}
grep -qsx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir .whl
plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  plat+=(--platform "$p")
done
# No dependency resolution (it would pull a second torch): the missing ones by name, at versions that
# ran together on the H100 image (Python 3.12, torch 2.11; pydantic and pydantic_core must match).
for pkg in ray==2.60.0 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.3 pydantic_core==2.50.4 \
           annotated_types==0.8.0 typing_inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16 \
           segmentation_models_pytorch==0.6.0 jsonschema jsonschema-specifications referencing rpds-py; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
python3 - <<'PYEOF'
import glob, os, zipfile

src = glob.glob(".whl/ray-*.whl")[0]
drop = ("ray/jars/", "ray/rllib/", "ray/dashboard/client/build/")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_LZMA) as zo:
    for info in zi.infolist():
        if info.filename.startswith(drop):
            continue
        data = zi.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(line for line in data.split(b"\n") if not line.decode().startswith(drop))
        zo.writestr(info.filename, data, zipfile.ZIP_LZMA)
os.replace(src + ".tmp", src)
PYEOF
du -sh .whl
