#!/usr/bin/env bash
# Builds osp with the `cuda` feature on a machine with no GPU and no CUDA toolkit.
#
# NVIDIA publishes nvcc and the CUDA libraries as PyPI wheels; this script installs one pinned
# CUDA version (13.0, the lent GPUs' driver 580) into a venv of its own, makes the link folder
# the linker needs (unversioned .so names and a link stub for the driver, which no wheel
# ships), and runs cargo into its own target folder. The binary links the driver by its
# soname, libcuda.so.1, so at run time the real driver is loaded; the stub is never needed
# there.
#
#   scripts/cuda-build.sh            build the release binary and the CUDA test binary and
#                                    stage them in gpu/ (what gpu-check.sh runs; see stage_gpu)
#   scripts/cuda-build.sh check      cargo check --release --features cuda --all-targets
#   scripts/cuda-build.sh clippy     cargo clippy --release --features cuda --all-targets
#                                    -- -D warnings
# check and clippy use the release profile so that they reuse the kernels the build compiled
# (a build script runs once per profile: a dev-profile check would compile them again).
#   scripts/cuda-build.sh env        print the environment, for `eval "$(... env)"`
#
# Environment: OSP_CUDA_DIR (venv and link folder; default .cuda), CARGO_TARGET_DIR (default
# target-cuda), OSP_CUDA_NICE (niceness of cargo; default 19: the kernels take minutes).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cuda_dir=${OSP_CUDA_DIR:-$repo/.cuda}
venv=$cuda_dir/venv
links=$cuda_dir/link
target=${CARGO_TARGET_DIR:-$repo/target-cuda}
nice_level=${OSP_CUDA_NICE:-19}

# One CUDA version for every wheel: mixed versions fail ("CUDA compiler and CUDA toolkit
# headers are incompatible"). 13.0 matches the driver (580) of the GPUs this was built for.
pins=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-nvrtc==13.0.*"
  "nvidia-cublas==13.0.*"
  "nvidia-curand==10.4.0.*"
)

log() { printf '[cuda-build] %s\n' "$*" >&2; }

install_wheels() {
  local stamp=$venv/.osp-pins
  if [[ -f $stamp && "$(cat "$stamp")" == "${pins[*]}" ]]; then
    return
  fi
  local py=${PYTHON:-python3}
  command -v "$py" >/dev/null || { log "needs python3 (with venv and pip)"; exit 1; }
  log "installing the NVIDIA wheels into $venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  printf '%s' "${pins[*]}" >"$stamp"
}

# The toolkit the wheels lay out: site-packages/nvidia/cu13/{bin,include,lib}.
cuda_root() {
  local root
  root=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n1)
  [[ -x $root/bin/nvcc ]] || { log "no nvcc under $venv (install failed?)"; exit 1; }
  printf '%s' "$root"
}

# The linker looks for libNAME.so; the wheels ship only versioned names (libcublas.so.13).
make_links() {
  local root=$1
  mkdir -p "$links"
  local lib
  for lib in cublas cublasLt cudart curand nvrtc; do
    local real
    real=$(ls "$root"/lib/lib$lib.so.* 2>/dev/null | sort | head -n1)
    [[ -n $real ]] || { log "lib$lib.so.* is missing from $root/lib"; exit 1; }
    ln -sfn "$real" "$links/lib$lib.so"
  done
  make_driver_stub
}

# The driver (libcuda.so.1) comes with the GPU's kernel module, so no wheel has it. cudarc
# links it by name (candle-core turns on cudarc's `dynamic-linking`, which excludes its
# `dynamic-loading`), so the linker needs a library that defines every driver symbol. This
# stub defines each one as an empty function and carries the real soname, so the binary
# records `NEEDED libcuda.so.1` and loads the real driver at run time.
make_driver_stub() {
  local stub=$links/libcuda.so
  local cudarc
  cudarc=$(cargo_registry_src cudarc)
  local src=$cudarc/src/driver/sys/mod.rs
  [[ -f $src ]] || { log "cannot find cudarc's driver bindings ($src)"; exit 1; }
  [[ -f $stub && $stub -nt $src && $stub -nt "${BASH_SOURCE[0]}" ]] && return
  log "building the driver link stub from $src"
  local c=$cuda_dir/libcuda-stub.c
  # Every `fn cu...(` declared in the bindings' `extern "C"` blocks; a stub needs names only.
  grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$src" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' |
    sort -u | awk '{ printf "void %s(void) {}\n", $1 }' >"$c"
  [[ -s $c ]] || { log "no driver symbols found in $src"; exit 1; }
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$c"
}

# Where cargo unpacked a dependency's source (fetching it first if needed).
cargo_registry_src() {
  local name=$1
  local version
  version=$(awk -v n="$name" '$0 == "name = \"" n "\"" { getline; gsub(/version = |"/, ""); print; exit }' \
    "$repo/Cargo.lock")
  [[ -n $version ]] || { log "$name is not in Cargo.lock"; exit 1; }
  local home=${CARGO_HOME:-$HOME/.cargo}
  local dir
  dir=$(ls -d "$home"/registry/src/*/"$name-$version" 2>/dev/null | head -n1)
  if [[ -z $dir ]]; then
    (cd "$repo" && cargo fetch --locked >/dev/null)
    dir=$(ls -d "$home"/registry/src/*/"$name-$version" | head -n1)
  fi
  printf '%s' "$dir"
}

setup_env() {
  install_wheels
  local root
  root=$(cuda_root)
  make_links "$root"
  export CUDA_ROOT=$root
  export CUDARC_CUDA_VERSION=13000 # cudarc 0.19 knows 13.0, and the driver is 580
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} # H100/H200; no nvidia-smi here to ask
  export PATH=$root/bin:$PATH
  export RUSTFLAGS="${RUSTFLAGS:-} -L native=$links"
  export CARGO_TARGET_DIR=$target
}

# gpu/: what scripts/gpu-check.sh runs on the GPU machine, small enough to carry there (the
# device tool carries 64 MiB a call): the two binaries stripped and xz-compressed (each is
# ~60 MB, mostly candle's PTX and GGUF kernels, which compress 8:1), and stories260K. The
# SmolLM2 GGUF (94 MB) cannot travel in one call: it is split into gpu-gguf-1/ and
# gpu-gguf-2/, carried in two calls and joined there (see gpu-check.sh).
stage_gpu() {
  local osp=$1 tests=$2
  local out=$repo/gpu
  rm -rf "$out"
  mkdir -p "$out"
  local name
  for name in osp cuda-tests; do
    local src=$osp
    [[ $name == cuda-tests ]] && src=$tests
    strip -o "$out/$name" "$src"
    nice -n "$nice_level" xz -9 -T0 -f "$out/$name"
  done
  local data=$repo/../shared/data
  if [[ -f $data/models/stories260K/stories260K.bin ]]; then
    mkdir -p "$out/data/models/stories260K"
    cp "$data"/models/stories260K/{stories260K.bin,tok512.bin} "$out/data/models/stories260K/"
  fi
  local gguf=$data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -rf "$repo/gpu-gguf-1" "$repo/gpu-gguf-2"
  if [[ -f $gguf ]]; then
    mkdir -p "$repo/gpu-gguf-1" "$repo/gpu-gguf-2"
    local half=$((54 * 1024 * 1024))
    head -c "$half" "$gguf" >"$repo/gpu-gguf-1/part"
    tail -c +"$((half + 1))" "$gguf" >"$repo/gpu-gguf-2/part"
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") >"$out/gguf.sha256"
  fi
  log "staged for the GPU machine (carry gpu; the GGUF parts in a second call):"
  du -sh "$out" "$repo"/gpu-gguf-* >&2 2>/dev/null || true
  ls -lR "$out" >&2
}

cmd=${1:-build}
case $cmd in
env)
  setup_env
  for v in CUDA_ROOT CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP PATH RUSTFLAGS CARGO_TARGET_DIR; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  ;;
check)
  setup_env
  cd "$repo"
  nice -n "$nice_level" cargo check --release --features cuda --all-targets
  ;;
clippy)
  setup_env
  cd "$repo"
  nice -n "$nice_level" cargo clippy --release --features cuda --all-targets -- -D warnings
  ;;
build)
  setup_env
  cd "$repo"
  start=$(date +%s)
  nice -n "$nice_level" cargo build --release --features cuda --bin osp
  # The CUDA test binary; `--message-format` names its hashed path.
  test_bin=$(nice -n "$nice_level" cargo test --release --features cuda --test cuda --no-run \
    --message-format=json | grep -o '"executable":"[^"]*"' | sed -E 's/"executable":"(.*)"/\1/' |
    tail -n1)
  [[ -n $test_bin ]] || { log "the cuda test binary was not built"; exit 1; }
  log "built in $(($(date +%s) - start)) s"
  log "dynamic dependencies of $target/release/osp:"
  ldd "$target/release/osp" >&2 || true
  stage_gpu "$target/release/osp" "$test_bin"
  ;;
*)
  log "unknown command '$cmd' (build, check, clippy or env)"
  exit 2
  ;;
esac
