#!/usr/bin/env bash
# Build ExecuTorch's executor_runner with the CUDA backend from an ExecuTorch source tree, and this
# project's runners (tools/runner/: the same runner with libet_int4.so linked in, and eagle_runner), into OUT,
# stripped, with rpath $ORIGIN so that OUT can be copied anywhere.
#
# Usage: tools/build_executor_runner.sh SRC [OUT]
#   SRC  an ExecuTorch source tree >= 1.3 with its submodules, in a folder named executorch:
#        git clone --recursive --branch vX.Y.Z https://github.com/pytorch/executorch
#   OUT  default: .runner/ in the project (git-ignored)
# Environment (all optional):
#   CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES of every kernel (default 90, the H100)
#   JOBS        parallel compile jobs (default: the number of cores)
#   BUILD_DIR   the build trees (default build/runner-<version> in the project, git-ignored)
#   CURAND_DIR  a folder with include/curand_kernel.h and lib/libcurand.so*, for a CUDA toolkit that
#               lacks them (the nvidia-curand wheel's nvidia/cu13); found in PYTHON's site-packages
#               when that wheel is installed there
#   PYTHON      the interpreter whose torch gives ExecuTorch's build the AOTI headers (its
#               PYTHON_EXECUTABLE) and whose executorch should be SRC's release (default python3)
#   CMAKE       cmake >= 3.29 (default cmake)
set -euo pipefail

MIN_VERSION=1.3          # the first release whose runner has --method_name and shares weights
MIN_CMAKE=3.29           # backends/cuda/CMakeLists.txt of ExecuTorch asks for it
SUBMODULES=(third-party/flatbuffers third-party/flatcc third-party/gflags third-party/json
            backends/xnnpack/third-party/FXdiv)

die() { echo "build_executor_runner: error: $*" >&2; exit 1; }
version_lt() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$1" ]; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 SRC [OUT]  (SRC: an ExecuTorch source tree >= $MIN_VERSION)"
project=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$(cd "$1" 2>/dev/null && pwd) || die "$1 is not a folder; get the source with
  git clone --recursive --branch vX.Y.Z https://github.com/pytorch/executorch"
out=${2:-$project/.runner}
# OUT is replaced by each build: refuse a folder that holds anything but an earlier build.
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/executor_runner" ]; then
  die "$out holds files but no executor_runner; name an empty or new folder as OUT"
fi
python=${PYTHON:-python3}
cmake=${CMAKE:-cmake}
archs=${CUDA_ARCHS:-90}
jobs=${JOBS:-$(nproc)}

# -- the tree ----------------------------------------------------------------------------------
[ -f "$src/version.txt" ] || die "$src has no version.txt: not an ExecuTorch source tree"
version=$(tr -d '[:space:]' < "$src/version.txt")
release=${version%%[a-z+]*}  # 1.5.0a0 -> 1.5.0
version_lt "$release" "$MIN_VERSION" && die "$src is ExecuTorch $version; the runner needs >= $MIN_VERSION
  (1.2 has no --method_name and cannot share weights between methods): check out v$MIN_VERSION.0 or newer"
for sub in "${SUBMODULES[@]}"; do
  [ -n "$(ls -A "$src/$sub" 2>/dev/null)" ] || die "$src/$sub is empty: run
  git -C $src submodule update --init --recursive"
done

installed=$("$python" -c 'import importlib.metadata as m; print(m.version("executorch"))' 2>/dev/null) || installed=none
if [ "$installed" != "$version" ]; then
  cat >&2 <<WARN
################################################################################################
WARNING: this tree is ExecuTorch $version, but $python has executorch $installed installed.
  The CUDA payload in a .pte changes between releases: a .pte exported by executorch $installed
  may not load in this runner (e.g. 'Malformed named-data key payload'). Export with
  executorch==$version, or build the runner from the tree of v$installed.
################################################################################################
WARN
fi

# -- the tools -----------------------------------------------------------------------------------
cmake_version=$("$cmake" --version 2>/dev/null | head -n 1 | awk '{print $3}') || true
[ -n "$cmake_version" ] || die "no cmake ($cmake); install one >= $MIN_CMAKE: pip install cmake"
version_lt "$cmake_version" "$MIN_CMAKE" && die "cmake $cmake_version is older than $MIN_CMAKE, which \
ExecuTorch's CUDA backend needs: pip install cmake (then CMAKE=\$(which cmake) if another comes first)"
command -v nvcc >/dev/null || die "no nvcc on PATH: the CUDA backend needs the CUDA toolkit"
cuda_include=$(dirname "$(command -v nvcc)")/../include
if [ ! -f "$cuda_include/curand_kernel.h" ] && [ -z "${CURAND_DIR:-}" ]; then
  CURAND_DIR=$("$python" -c 'import nvidia, pathlib; print(next(pathlib.Path(p) / "cu13" for p in nvidia.__path__ if (pathlib.Path(p) / "cu13/include/curand_kernel.h").is_file()))' 2>/dev/null) || true
fi
curand_args=()
if [ ! -f "$cuda_include/curand_kernel.h" ]; then
  [ -n "${CURAND_DIR:-}" ] && [ -f "$CURAND_DIR/include/curand_kernel.h" ] || die "the CUDA toolkit at \
$cuda_include has no curand_kernel.h: pip install nvidia-curand (CUDA 13), or set CURAND_DIR to a \
folder with include/curand_kernel.h and lib/libcurand.so*"
  curand_lib=$(ls "$CURAND_DIR"/lib/libcurand.so* | head -n 1)
  curand_args=(-DCMAKE_CUDA_FLAGS="-I$CURAND_DIR/include" -DCMAKE_CXX_FLAGS="-I$CURAND_DIR/include"
               -DCUDA_curand_LIBRARY="$curand_lib")
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

build=${BUILD_DIR:-$project/build/runner-$version}
python_path=$(command -v "$python") || die "no $python: set PYTHON to an interpreter that has torch"
common=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$archs"
        -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON
        -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--as-needed -DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed
        "${curand_args[@]}" "${generator[@]}")

# -- 1. ExecuTorch: its executor_runner, and an install tree for the project's runners ----------
echo "== ExecuTorch $version from $src -> $build/executorch (CUDA archs $archs, $jobs jobs)"
"$cmake" -S "$src" -B "$build/executorch" "${common[@]}" -DPYTHON_EXECUTABLE="$python_path" \
  -DCMAKE_INSTALL_PREFIX="$build/install" \
  -DEXECUTORCH_BUILD_CUDA=ON \
  -DEXECUTORCH_BUILD_PORTABLE_OPS=ON \
  -DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON \
  -DEXECUTORCH_BUILD_PTHREADPOOL=OFF -DEXECUTORCH_BUILD_CPUINFO=OFF \
  -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON \
  -DEXECUTORCH_BUILD_EXTENSION_MODULE=ON \
  -DEXECUTORCH_BUILD_EXTENSION_FLAT_TENSOR=ON \
  -DEXECUTORCH_BUILD_EXTENSION_NAMED_DATA_MAP=ON \
  -DEXECUTORCH_BUILD_EXTENSION_TENSOR=ON \
  -DEXECUTORCH_ENABLE_LOGGING=ON
"$cmake" --build "$build/executorch" -j "$jobs"
"$cmake" --install "$build/executorch" > /dev/null

# -- 2. this project's runners (tools/runner/CMakeLists.txt) ------------------------------------
echo "== the project's runners -> $build/project"
"$cmake" -S "$project/tools/runner" -B "$build/project" "${common[@]}" \
  -DCMAKE_PREFIX_PATH="$build/install" -DEXECUTORCH_SRC="$src" -DEXECUTORCH_BUILD_DIR="$build/executorch" \
  -DCMAKE_INSTALL_PREFIX="$out"
"$cmake" --build "$build/project" -j "$jobs"
rm -rf "$out"
"$cmake" --install "$build/project" --strip > /dev/null

# -- 3. report ----------------------------------------------------------------------------------
echo "== $out ($(du -sh "$out" | cut -f1)), ExecuTorch $version"
ls -l "$out"
cat <<RUN

Run a method (the runner needs libcudart.so.13: add torch's nvidia/cu13/lib to LD_LIBRARY_PATH):
  LD_LIBRARY_PATH=\$(python -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parents[1] / "nvidia/cu13/lib")') \\
  LD_PRELOAD=\$(python -c 'import et_int4.runtime as r; print(r.library_path())') \\
    $out/executor_runner --model_path out/eagle.pte --data_path out/aoti_cuda_blob.ptd --method_name target_verify
or, with libet_int4.so linked in (no LD_PRELOAD):
    $out/executor_runner_et_int4 --model_path out/eagle.pte --data_path out/aoti_cuda_blob.ptd --method_name target_verify
Speculative decoding (README, "Speculative decoding with eagle_runner"):
    $out/eagle_runner --model_path out/eagle.pte --data_path out/aoti_cuda_blob.ptd --prompt "1 2 3"
Tests: ET_INT4_EXECUTOR_RUNNER=$out/executor_runner pytest -m cuda tests/test_runner_e2e.py
       ET_INT4_EAGLE_RUNNER=$out/eagle_runner pytest -m cuda tests/test_eagle_runner.py
RUN
