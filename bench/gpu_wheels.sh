#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels the GPU machine lacks, into .whl/
# (ignore it: `echo /.whl/ >> .git/info/exclude`). That machine has Python 3.12 with torch,
# lightning, torchmetrics, timm, pytest, numpy, requests, pyyaml and friends, but not jsonargparse,
# wandb or wandb-workspaces and some of their dependencies. bench/gpu_all.sh's header says how to
# install them there.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$tmp" "wandb==0.31.0" "wandb-workspaces==0.4.13" "jsonargparse[signatures]==4.53.0"
mkdir -p .whl
# keep what the GPU machine's image does not already hold (or holds in a version too old for these)
for name in annotated_types click cwevals distro docstring_parser googleapis_common_protos jsonargparse \
    opentelemetry platformdirs protobuf pydantic typeshed_client typing_extensions typing_inspection wandb; do
    cp "$tmp"/"$name"*.whl .whl/
done
rm -rf "$tmp"
du -sh .whl
