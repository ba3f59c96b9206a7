#!/usr/bin/env bash
# Installs what building and testing PiKV needs on Debian/Ubuntu.
# Packages already present are not fetched again.
set -euo pipefail
# OpenCL: headers and the ICD loader to build the backend, PoCL to run it on the CPU.
# Vulkan: headers and glslc to build the backend, the loader and Mesa's lavapipe
# (software Vulkan) to run it, the Khronos validation layer for the validated test run.
# MPI: Open MPI's headers and libraries to build the MPI communicator, mpirun to run its tests.
# NUMA: libnuma to bind the host memory tier to a node (tiers.numa_node).
# Python venv: tools/setup-model.sh makes one for the model reference scripts (numpy, gguf,
# tokenizers). bible-kjv: public-domain text, the tokenizer test's corpus.
packages=(build-essential cmake ninja-build pkg-config clang
          ocl-icd-opencl-dev opencl-headers pocl-opencl-icd clinfo
          libvulkan-dev libvulkan1 glslc mesa-vulkan-drivers vulkan-validationlayers vulkan-tools
          libopenmpi-dev openmpi-bin libnuma-dev
          python3 python3-venv bible-kjv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "setup: ${#missing[@]} package(s) installed; all of ${packages[*]} present"
