#!/usr/bin/env bash
# Source trees of git refs under scratch/ (untracked: it travels to the device machine; delete it
# before committing) for `bash bench/run_device.sh ab`, which builds each and times it against the
# working tree. Prints the AB_TREES value; the first ref is the bit reference.
#   bash bench/ab_trees.sh main exp/router-tail   ->   AB_TREES="main=scratch/main router-tail=scratch/router-tail"
set -euo pipefail
cd "$(dirname "$0")/.."
trees=()
for ref in "$@"; do
  name=${ref##*/}
  rm -rf "scratch/$name"
  mkdir -p "scratch/$name"
  git archive "$ref" csrc CMakeLists.txt pyproject.toml python README.md | tar -x -C "scratch/$name"
  rm -rf "scratch/$name/python/flashmoe_native/models"  # the bundled model's files: not built, and large
  trees+=("$name=scratch/$name")
done
echo "AB_TREES=\"${trees[*]}\""
