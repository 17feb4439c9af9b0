#!/usr/bin/env bash
# Installs the Debian packages dmoe builds against and its tests use (idempotent; needs
# root or sudo). Recommends are not installed, so every package the build or a test
# needs is named here, also those Debian would only pull in as a Recommends (e.g.
# ocl-icd-opencl-dev: libdnnl-dev's CMake config finds OpenCL). tools/fresh_root_check.sh
# proves the build part on a fresh Debian 12 root.
set -euo pipefail
PKGS=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config
  # libraries: find_package / pkg_check_modules / find_library in the CMakeLists
  libabsl-dev nlohmann-json3-dev libdnnl-dev ocl-icd-opencl-dev libpcre2-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev libcpp-httplib-dev libgoogle-perftools-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  # fuzz targets (tools/fuzz.sh): clang 14 with libFuzzer and the sanitizer runtimes,
  # its OpenMP (find_package(OpenMP) under clang), llvm-symbolizer for the reports;
  # clang 14 also runs tools/thread_safety_check.sh, clang-format-14 tools/format_check.sh
  clang-14 clang-format-14 libclang-rt-14-dev libomp-14-dev llvm-14
  # programs the tests run: prometheus + promtool (observability, alert rules),
  # docker-compose, yamllint, python3 + PyYAML, jq and curl (deploy/ scripts)
  prometheus docker-compose yamllint python3 python3-yaml jq curl ca-certificates
  # serve_bench --plot draws its latency/throughput curves with gnuplot (png terminal)
  gnuplot-nox
)
# node + npm run the tokenizer reference (tests/tokenizer_ref, `npm ci` from the npm
# registry). Debian's nodejs and npm unless both commands exist already: NodeSource's
# nodejs bundles npm and conflicts with Debian's npm package, so asking for npm there
# would replace that nodejs.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  PKGS+=(nodejs npm)
fi
# Not installed: kubectl. Debian's kubernetes-client (1.20) has kustomize v2, too old
# for deploy/k8s; the tests that render the manifests skip without kubectl >= kustomize v4.
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO=sudo
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
