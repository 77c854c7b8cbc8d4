# Sourced (`. bench/device/site.sh || exit`) by a device script: diffusers and webdataset into /tmp/site and on
# PYTHONPATH, from .site/site.tar.xz (bench/device/pack_site.sh; carry ".site") or else from the wheels in .whl/
# (carry ".whl"; only while the tree is small enough beside them).
if [ -f .site/site.tar.xz ]; then
  tar -xJf .site/site.tar.xz -C /tmp || return 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
fi
export PYTHONPATH=/tmp/site:$PWD/src
