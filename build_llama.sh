#!/usr/bin/env bash
# build_llama.sh: build llama.cpp's llama-server for ollama.py (bin/llama-server beside ollama.py).
#
# The source is, in this order: --source DIR (a llama.cpp checkout), --sdist FILE (a llama-cpp-python
# source tarball already on disk), or the pinned llama-cpp-python sdist from PyPI, whose vendor/llama.cpp
# we build. Everything is cached under ${XDG_CACHE_HOME:-~/.cache}/ollama-py, so running it again is
# cheap, and a no-op when the same source and flags are already built into the prefix.
# Runs on bash 3.2 (macOS) too: no associative arrays, no empty-array expansion under `set -u`.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ollama-py"

usage() {
    cat <<EOF
Usage: ./build_llama.sh [options] [-- extra cmake -D flags]   (e.g. -- -DCMAKE_CUDA_ARCHITECTURES=90)

Build llama.cpp's llama-server (statically linked) and write it to bin/llama-server beside
ollama.py, with bin/llama-server.build-info describing the build. Re-running with the same
source and flags does nothing.

Source (first one given wins; default: llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION} from PyPI):
  --source DIR     build the llama.cpp checkout in DIR (a git checkout counts as unchanged while
                   its commit and diff are; any other directory is always handed to cmake)
  --sdist FILE     build the llama.cpp vendored in a llama-cpp-python sdist already on disk
                   (for machines without network; ${LLAMA_CPP_PYTHON_VERSION} is checked against its sha256)

Accelerator (default: CUDA if nvcc and an NVIDIA driver are found, Metal on Apple Silicon, else CPU):
  --cpu            CPU only
  --cuda           NVIDIA CUDA (needs nvcc on PATH or in /usr/local/cuda/bin); built for this
                   machine's GPU, so without one add --portable or -- -DCMAKE_CUDA_ARCHITECTURES=90
  --metal          Apple Metal
  --vulkan         Vulkan (needs the Vulkan SDK / glslc)

Build:
  --portable       do not tune for this CPU or GPU (GGML_NATIVE=OFF), for binaries copied to other machines
  --rpc            also build rpc-server (GGML_RPC=ON) for llama.cpp's distributed inference
  --jobs N, -j N   parallel compile jobs (default: number of cores, here $(cpu_count))
  --prefix DIR     write llama-server there instead of ${HERE}/bin
  --force          rebuild and reinstall even when already built
  -h, --help       show this help

Cache: ${CACHE}
  src/             the sdist and its extracted tree
  build/<version>-<flavor>   cmake build dirs (flavor: cpu, cuda, metal, vulkan, plus -portable, -rpc)
EOF
}

die() { echo "build_llama.sh: error: $*" >&2; exit 1; }
note() { echo "build_llama.sh: $*" >&2; }

cpu_count() {
    nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2
}

sha256_file() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

sha256_text() {
    if command -v sha256sum >/dev/null 2>&1; then printf '%s' "$1" | sha256sum | cut -d' ' -f1
    else printf '%s' "$1" | shasum -a 256 | cut -d' ' -f1; fi
}

install_hint() {
    # $1: what is missing. Name the package for each package manager we know.
    echo "build_llama.sh: error: $1 not found; building llama-server needs cmake and a C/C++ compiler." >&2
    echo "  Debian/Ubuntu: sudo apt-get install cmake g++" >&2
    echo "  Fedora/RHEL:   sudo dnf install cmake gcc-c++" >&2
    echo "  macOS:         xcode-select --install && brew install cmake" >&2
    exit 1
}

find_nvcc() {
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc
    elif [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc
    else return 1; fi
}

have_nvidia_driver() {
    # A CUDA build cannot run without the driver (libcuda), so nvcc alone does not pick CUDA.
    command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ] || [ -e /dev/nvidiactl ]
}

# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------
source_dir="" sdist="" accel="" portable=0 rpc=0 jobs="" prefix="$HERE/bin" force=0
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --source) [ $# -ge 2 ] || die "--source needs a directory"; source_dir="$2"; shift ;;
        --source=*) source_dir="${1#*=}" ;;
        --sdist) [ $# -ge 2 ] || die "--sdist needs a file"; sdist="$2"; shift ;;
        --sdist=*) sdist="${1#*=}" ;;
        --cpu|--cuda|--metal|--vulkan) accel="${1#--}" ;;
        --portable) portable=1 ;;
        --rpc) rpc=1 ;;
        --jobs|-j) [ $# -ge 2 ] || die "$1 needs a number"; jobs="$2"; shift ;;
        --jobs=*) jobs="${1#*=}" ;;
        -j[0-9]*) jobs="${1#-j}" ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift ;;
        --prefix=*) prefix="${1#*=}" ;;
        --force) force=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[ -n "$jobs" ] || jobs="$(cpu_count)"
case "$jobs" in ''|*[!0-9]*) die "--jobs wants a number, not '$jobs'" ;; esac

# ---------------------------------------------------------------------------------------------------
# Accelerator, flavor and cmake flags
# ---------------------------------------------------------------------------------------------------
nvcc_path="" accel_note=""
if [ -z "$accel" ]; then
    if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
        accel=metal
    elif nvcc_path="$(find_nvcc)"; then
        if have_nvidia_driver; then accel=cuda
        else accel=cpu; accel_note="nvcc found but no NVIDIA driver: building for CPU (--cuda forces CUDA)"; fi
    else
        accel=cpu
    fi
fi
if [ "$accel" = cuda ] && [ -z "$nvcc_path" ]; then
    nvcc_path="$(find_nvcc)" || die "--cuda: nvcc not found on PATH or in /usr/local/cuda/bin (install the CUDA toolkit)"
fi
[ "$accel" != metal ] || [ "$(uname -s)" = Darwin ] || die "--metal: Metal needs macOS"
if [ "$accel" = cuda ] && [ "$portable" = 0 ] && ! have_nvidia_driver; then
    case " ${extra[*]:-} " in *CMAKE_CUDA_ARCHITECTURES*) ;;
        *) die "--cuda without a GPU here: add --portable (all architectures) or -- -DCMAKE_CUDA_ARCHITECTURES=<sm, e.g. 90>" ;;
    esac
fi

flavor="$accel"
[ "$portable" = 1 ] && flavor="$flavor-portable"
[ "$rpc" = 1 ] && flavor="$flavor-rpc"

on_off() { if [ "$1" = "$2" ]; then echo ON; else echo OFF; fi; }
native=ON; [ "$portable" = 1 ] && native=OFF
# The default CPU build's flags, in this order, are those of the prebuilt cache dir: keep them identical
# so cmake finds nothing to do there.
flags=(
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
    "-DGGML_NATIVE=$native" "-DGGML_CUDA=$(on_off "$accel" cuda)" "-DGGML_METAL=$(on_off "$accel" metal)"
)
[ "$accel" = metal ] && flags+=(-DGGML_METAL_EMBED_LIBRARY=ON)   # one self-contained binary
[ "$accel" = vulkan ] && flags+=(-DGGML_VULKAN=ON)
[ "$accel" = cuda ] && ! command -v nvcc >/dev/null 2>&1 && flags+=("-DCMAKE_CUDA_COMPILER=$nvcc_path")
[ "$rpc" = 1 ] && flags+=(-DGGML_RPC=ON)
[ ${#extra[@]} -gt 0 ] && flags+=("${extra[@]}")
targets=(llama-server)
[ "$rpc" = 1 ] && targets+=(rpc-server)

# ---------------------------------------------------------------------------------------------------
# Source identity (cheap: no download, no extraction) and the "already built" check
# ---------------------------------------------------------------------------------------------------
src_kind="" version="" src_sha="" src_desc=""
if [ -n "$source_dir" ]; then
    [ -f "$source_dir/CMakeLists.txt" ] || die "--source $source_dir: not a llama.cpp checkout (no CMakeLists.txt)"
    source_dir="$(cd "$source_dir" && pwd)"
    src_kind=dir
    # One build dir per checkout path; a git checkout is identified by its commit (and dirty state).
    version="src-$(sha256_text "$source_dir" | cut -c1-12)"
    if git -C "$source_dir" rev-parse HEAD >/dev/null 2>&1; then
        commit="$(git -C "$source_dir" rev-parse HEAD)"
        dirty="$(git -C "$source_dir" status --porcelain --untracked-files=no 2>/dev/null | head -c 100000)"
        src_sha="git:$commit"
        [ -n "$dirty" ] && src_sha="$src_sha+dirty:$(sha256_text "$(git -C "$source_dir" diff HEAD 2>/dev/null)" | cut -c1-16)"
    fi
    src_desc="llama.cpp checkout $source_dir"
elif [ -n "$sdist" ]; then
    [ -f "$sdist" ] || die "--sdist $sdist: no such file"
    sdist="$(cd "$(dirname "$sdist")" && pwd)/$(basename "$sdist")"
    src_kind=sdist
    base="$(basename "$sdist")"
    case "$base" in
        llama_cpp_python-?*.tar.gz|llama-cpp-python-?*.tar.gz) ;;
        *) die "--sdist $sdist: expected a file named llama_cpp_python-<version>.tar.gz" ;;
    esac
    version="${base#llama_cpp_python-}"; version="${version#llama-cpp-python-}"; version="${version%.tar.gz}"
    case "$version" in *[!A-Za-z0-9.+_-]*) die "--sdist $sdist: odd version '$version' in the file name" ;; esac
    src_sha="$(sha256_file "$sdist")"
    if [ "$version" = "$LLAMA_CPP_PYTHON_VERSION" ] && [ "$src_sha" != "$LLAMA_CPP_PYTHON_SHA256" ]; then
        die "--sdist $sdist: sha256 $src_sha, expected $LLAMA_CPP_PYTHON_SHA256 for $LLAMA_CPP_PYTHON_VERSION"
    fi
    src_desc="llama-cpp-python $version sdist"
else
    src_kind=pypi
    version="$LLAMA_CPP_PYTHON_VERSION"
    src_sha="$LLAMA_CPP_PYTHON_SHA256"
    src_desc="llama-cpp-python $version sdist"
fi

build_dir="$CACHE/build/$version-$flavor"
info="$prefix/llama-server.build-info"
identity_text="source=$version:$src_sha
flags=${flags[*]}
targets=${targets[*]}"
identity="$(sha256_text "$identity_text")"

already_built() {
    [ -n "$src_sha" ] || return 1            # a non-git checkout: let cmake decide what is stale
    [ -f "$info" ] && grep -qx "identity: $identity" "$info" || return 1
    for t in "${targets[@]}"; do [ -x "$prefix/$t" ] || return 1; done
}

if [ "$force" = 0 ] && already_built; then
    echo "already built $prefix/llama-server from $src_desc ($flavor) (nothing to do; --force rebuilds)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------
[ -z "$accel_note" ] || note "$accel_note"
command -v cmake >/dev/null 2>&1 || install_hint cmake
cc_ok=0
for c in "${CC:-}" cc gcc clang; do [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { cc_ok=1; break; }; done
[ "$cc_ok" = 1 ] || install_hint "a C compiler (cc, gcc or clang)"
cxx_ok=0
for c in "${CXX:-}" c++ g++ clang++; do [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { cxx_ok=1; break; }; done
[ "$cxx_ok" = 1 ] || install_hint "a C++ compiler (c++, g++ or clang++)"

# ---------------------------------------------------------------------------------------------------
# Source tree
# ---------------------------------------------------------------------------------------------------
extract_sdist() {
    # $1: sdist file, $2: sha256. Extracts once to src/llama_cpp_python-<version>/ (temp dir, then rename).
    local dest="$CACHE/src/llama_cpp_python-$version" tmp
    if [ -f "$dest/.ollama-py-sha256" ] && [ "$(cat "$dest/.ollama-py-sha256")" = "$2" ]; then :
    elif [ -f "$dest/vendor/llama.cpp/CMakeLists.txt" ] && [ ! -e "$dest/.ollama-py-sha256" ] && [ "$2" = "$LLAMA_CPP_PYTHON_SHA256" ]; then
        printf '%s\n' "$2" > "$dest/.ollama-py-sha256"   # extracted earlier by hand or an older script
    else
        command -v tar >/dev/null 2>&1 || die "tar not found"
        note "extracting $(basename "$1")"
        mkdir -p "$CACHE/src"
        tmp="$(mktemp -d "$CACHE/src/.extract.XXXXXX")"
        tar -xzf "$1" -C "$tmp" || { rm -rf "$tmp"; die "cannot extract $1"; }
        [ -f "$tmp/llama_cpp_python-$version/vendor/llama.cpp/CMakeLists.txt" ] \
            || { rm -rf "$tmp"; die "$1 has no llama_cpp_python-$version/vendor/llama.cpp"; }
        printf '%s\n' "$2" > "$tmp/llama_cpp_python-$version/.ollama-py-sha256"
        rm -rf "$dest"
        mv "$tmp/llama_cpp_python-$version" "$dest"
        rm -rf "$tmp"
    fi
    src_tree="$dest/vendor/llama.cpp"
}

case "$src_kind" in
    dir) src_tree="$source_dir" ;;
    sdist) extract_sdist "$sdist" "$src_sha" ;;
    pypi)
        file="$CACHE/src/llama_cpp_python-$version.tar.gz"
        if [ ! -f "$CACHE/src/llama_cpp_python-$version/.ollama-py-sha256" ] && \
           [ ! -f "$CACHE/src/llama_cpp_python-$version/vendor/llama.cpp/CMakeLists.txt" ]; then
            if [ ! -f "$file" ] || [ "$(sha256_file "$file")" != "$src_sha" ]; then
                py="$(command -v python3 || command -v python)" || die "python3 (with pip) is needed to download the source; or use --sdist/--source"
                note "downloading llama-cpp-python $version source from PyPI"
                mkdir -p "$CACHE/src"
                tmp="$(mktemp -d "$CACHE/src/.download.XXXXXX")"
                "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$tmp" \
                    "llama-cpp-python==$version" || { rm -rf "$tmp"; die "pip download of llama-cpp-python==$version failed"; }
                got="$(ls "$tmp"/*.tar.gz 2>/dev/null | head -1)"
                [ -n "$got" ] || { rm -rf "$tmp"; die "pip download produced no .tar.gz"; }
                got_sha="$(sha256_file "$got")"
                [ "$got_sha" = "$src_sha" ] || { rm -rf "$tmp"; die "downloaded sdist sha256 $got_sha, expected $src_sha"; }
                mv "$got" "$file"
                rm -rf "$tmp"
            fi
        fi
        extract_sdist "$file" "$src_sha" ;;
esac

# ---------------------------------------------------------------------------------------------------
# Configure, build, install
# ---------------------------------------------------------------------------------------------------
started=$(date +%s)
mkdir -p "$build_dir"
flags_stamp="$build_dir/.ollama-py-flags"
# Re-run configure only when the flags changed; cmake --build re-runs it itself when CMakeLists change.
if [ ! -f "$build_dir/CMakeCache.txt" ] || [ ! -f "$flags_stamp" ] || [ "$(cat "$flags_stamp")" != "${flags[*]}" ]; then
    note "configuring $build_dir"
    cmake -S "$src_tree" -B "$build_dir" "${flags[@]}"
    printf '%s' "${flags[*]}" > "$flags_stamp"
fi
note "building ${targets[*]} ($flavor, $jobs jobs)"
cmake --build "$build_dir" --config Release --target "${targets[@]}" -j "$jobs"

mkdir -p "$prefix"
for t in "${targets[@]}"; do
    out=""
    for cand in "$build_dir/bin/$t" "$build_dir/bin/Release/$t"; do [ -x "$cand" ] && { out="$cand"; break; }; done
    [ -n "$out" ] || die "build finished but $t is not in $build_dir/bin"
    # Copy then rename, so a running llama-server is never overwritten in place.
    cp "$out" "$prefix/.$t.tmp.$$"
    mv -f "$prefix/.$t.tmp.$$" "$prefix/$t"
done

cxx="$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build_dir/CMakeCache.txt" | head -1)"
compiler="$("${cxx:-c++}" --version 2>/dev/null | head -1 || true)"
{
    echo "# written by build_llama.sh; the identity line decides whether a rebuild is needed"
    echo "identity: $identity"
    echo "source: $src_desc"
    [ "$src_kind" = dir ] || echo "source_sha256: $src_sha"
    [ "$src_kind" = dir ] && echo "source_revision: ${src_sha:-unknown (not a git checkout)}"
    echo "source_tree: $src_tree"
    echo "flavor: $flavor"
    echo "cmake_flags: ${flags[*]}"
    echo "targets: ${targets[*]}"
    echo "compiler: ${compiler:-unknown}"
    echo "build_dir: $build_dir"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$info.tmp.$$"
mv -f "$info.tmp.$$" "$info"

echo "built $prefix/llama-server from $src_desc ($flavor) in $(( $(date +%s) - started ))s"
