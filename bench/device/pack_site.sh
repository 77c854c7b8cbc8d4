#!/usr/bin/env bash
# Run HERE (not on the device), from the repo root, after downloading the wheels into .whl/ (bench/device/ORDER.md):
# packs what the device lacks (diffusers, webdataset, braceexpand, importlib_metadata) into .site/site.tar.xz.
# Why: a call sends the working tree with what it carries, 64 MiB in all; the wheels are 6.5 MB (zip), the same
# files as one xz archive 2.0 MB, and the tracked tree (the toy model, a toy head, the results) is ~61 MB.
# A pure-Python wheel installs by unpacking (its .dist-info, which diffusers' version checks read, comes along).
set -e
rm -rf .site/tmp && mkdir -p .site/tmp/site
for w in .whl/*.whl; do python3 -m zipfile -e "$w" .site/tmp/site; done
tar -cJf .site/site.tar.xz.part -C .site/tmp site && mv .site/site.tar.xz.part .site/site.tar.xz && rm -rf .site/tmp
ls -la .site/site.tar.xz
