#!/usr/bin/env bash
# build_llama.sh: build llama.cpp's llama-server for ollama.py (bin/llama-server beside ollama.py).
#
# The source is, in this order: --source DIR (a llama.cpp checkout), --sdist FILE (a llama-cpp-python
# source tarball already on disk), or the pinned llama-cpp-python sdist from PyPI, whose vendor/llama.cpp
# we build. Everything is cached under ${XDG_CACHE_HOME:-~/.cache}/ollama-py (and ccache's own cache
# when ccache is installed), so running it again is cheap, and a no-op when the same request is already
# built into the prefix.
#
# A build is proven before it is installed: `ollama.py check-engine` runs the new llama-server on a tiny
# model it generates (prompt and generation, through the quantized CPU kernels). A binary that dies or
# fails is never installed: the script rebuilds with a safer CPU configuration (for x86-64: this CPU's
# instructions without AMX, then the x86-64-v3 baseline, then x86-64-v2) and says why.
# Runs on bash 3.2 (macOS) too: no associative arrays, no empty-array expansion under `set -u`.
set -euo pipefail
{   # the whole script is one block, read before it runs: editing or updating it mid-build is safe

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ollama-py"
AARCH64_SYSROOT=/usr/aarch64-linux-gnu      # Debian's crossbuild-essential-arm64 (and qemu-user's -L)

cpu_count() {
    nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2
}

usage() {
    cat <<EOF
Usage: ./build_llama.sh [options] [-- extra cmake -D flags]   (e.g. -- -DCMAKE_CUDA_ARCHITECTURES=90)

Build llama.cpp's llama-server, llama-quantize (for create --quantize) and rpc-server (for
ollama.py worker) and write them to bin/ beside ollama.py, with bin/llama-server.build-info
describing the build. Before installing, the new binary is run on a
tiny generated model (python3 ollama.py check-engine); one that dies or fails is never installed,
and the build is retried with a safer CPU configuration (see CPU below). Re-running with the same
request does nothing.

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

CPU (what the ggml CPU kernels may use; the rest of llama-server is plain code for the target):
  (default)        this machine's CPU (-march=native), except AMX on x86-64: ggml's AMX kernels
                   crash on many AMX machines (tile state is per thread, llama.cpp PR #26954)
  --amx            keep AMX when this CPU has it (the check falls back to no AMX if it crashes)
  --portable       not tuned for this CPU or GPU, for binaries copied to other machines: on x86-64
                   the baseline named by --baseline, on aarch64 armv8 (see --board); CUDA builds
                   all GPU architectures
  --baseline NAME  x86-64 baseline for --portable (implies it): x86-64-v3 (default: AVX2, FMA,
                   F16C, BMI2; Intel Haswell 2013 and AMD Excavator 2015 on) or x86-64-v2
                   (SSE4.2, POPCNT; any x86-64 CPU since 2009, much slower)
  --target ARCH    aarch64 cross-builds from x86-64 with Debian's crossbuild-essential-arm64 (the
                   binary goes to bin/aarch64-<board>/ unless --prefix says otherwise); the host's own
                   architecture (x86_64, aarch64) is a native build
  --board NAME     an aarch64 CPU preset (implies --target aarch64 on x86-64):
                     pi4    Raspberry Pi 4, Cortex-A72, ARMv8.0-A + CRC (no dot product)
                     pi5    Raspberry Pi 5, Cortex-A76, ARMv8.2-A + dotprod + fp16
                     armv8  any 64-bit ARM board, plain ARMv8.0-A
  --static         link libstdc++ and libgcc statically and use ggml's own thread pool instead of
                   OpenMP, so llama-server needs nothing but the C library (for copying)

Check (a few seconds natively; about a minute under qemu):
  --check-with CMD run the check under CMD, an emulator or wrapper, e.g. "qemu-x86_64" to prove the
                   binary runs on a CPU without AVX-512; cross builds default to
                   "qemu-aarch64 -cpu <board's CPU> -L ${AARCH64_SYSROOT}" (Debian's qemu-user)
  --no-check       install without running the check (recorded in build-info; not recommended)

Build:
  --rpc            build rpc-server and llama.cpp's RPC backend (GGML_RPC=ON), for ollama.py worker
                   and OLLAMA_RPC_SERVERS (the default)
  --no-rpc         leave them out
  --jobs N, -j N   parallel compile jobs (default: number of cores, here $(cpu_count))
  --prefix DIR     write llama-server there instead of ${HERE}/bin
  --force          rebuild and reinstall even when already built
  -h, --help       show this help

CFLAGS and CXXFLAGS from the environment are added to the compiler flags (and count as a different
build). ccache is used when it is installed.

Cache: ${CACHE}
  src/             the sdist and its extracted tree
  build/<version>-<flavor>   cmake build dirs (flavor: accelerator, CPU configuration, then
                   -static, -norpc: e.g. cpu-native, cpu-x86-64-v3-static, cpu-aarch64-pi4)
EOF
}

die() { echo "build_llama.sh: error: $*" >&2; exit 1; }
note() { echo "build_llama.sh: $*" >&2; }

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

normalize_arch() {
    case "$1" in
        x86_64|amd64|x86-64) echo x86_64 ;;
        aarch64|arm64) echo aarch64 ;;
        *) echo "$1" ;;
    esac
}

# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------
source_dir="" sdist="" accel="" portable=0 rpc=1 jobs="" prefix="" force=0
amx=0 baseline="" target="" board="" static=0 check=1 check_with=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --source) [ $# -ge 2 ] || die "--source needs a directory"; source_dir="$2"; shift ;;
        --source=*) source_dir="${1#*=}" ;;
        --sdist) [ $# -ge 2 ] || die "--sdist needs a file"; sdist="$2"; shift ;;
        --sdist=*) sdist="${1#*=}" ;;
        --cpu|--cuda|--metal|--vulkan) accel="${1#--}" ;;
        --portable) portable=1 ;;
        --amx) amx=1 ;;
        --baseline) [ $# -ge 2 ] || die "--baseline needs a name"; baseline="$2"; shift ;;
        --baseline=*) baseline="${1#*=}" ;;
        --target) [ $# -ge 2 ] || die "--target needs an architecture"; target="$2"; shift ;;
        --target=*) target="${1#*=}" ;;
        --board) [ $# -ge 2 ] || die "--board needs a name"; board="$2"; shift ;;
        --board=*) board="${1#*=}" ;;
        --static) static=1 ;;
        --check-with) [ $# -ge 2 ] || die "--check-with needs a command"; check_with="$2"; shift ;;
        --check-with=*) check_with="${1#*=}" ;;
        --no-check) check=0 ;;
        --rpc) rpc=1 ;;
        --no-rpc) rpc=0 ;;
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
# Target, CPU configuration, accelerator
# ---------------------------------------------------------------------------------------------------
host_arch="$(normalize_arch "$(uname -m)")"
case "$board" in
    ""|pi4|pi5|armv8) ;;
    *) die "--board $board: unknown board (pi4, pi5 or armv8)" ;;
esac
case "$baseline" in
    "") ;;
    x86-64-v2|x86-64-v3) portable=1 ;;
    *) die "--baseline $baseline: unknown baseline (x86-64-v3 or x86-64-v2)" ;;
esac
if [ -n "$target" ]; then target="$(normalize_arch "$target")"
elif [ -n "$board" ]; then target=aarch64
else target="$host_arch"; fi
case "$target" in x86_64|aarch64) ;; *) die "--target $target: x86_64 or aarch64" ;; esac
[ -z "$board" ] || [ "$target" = aarch64 ] || die "--board $board is an aarch64 preset, not for --target $target"
[ -z "$baseline" ] || [ "$target" = x86_64 ] || die "--baseline $baseline is an x86-64 baseline, not for --target $target"
cross=0
if [ "$target" != "$host_arch" ]; then
    [ "$host_arch" = x86_64 ] && [ "$target" = aarch64 ] \
        || die "cross builds go from x86-64 to aarch64 only (this machine is $host_arch)"
    cross=1
    [ -z "$accel" ] || [ "$accel" = cpu ] || die "--$accel: cross builds are CPU only"
    accel=cpu
    [ -n "$board" ] || { board=armv8; note "cross build without --board: the generic armv8 preset"; }
fi
[ "$target" = aarch64 ] && [ "$portable" = 1 ] && [ -z "$board" ] && board=armv8

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

# The CPU configurations to try, safest last: the first that passes the check is installed.
# x86-64: native (with or without AMX), then the x86-64-v3 and x86-64-v2 baselines. aarch64: native,
# then armv8; a board preset is what the user asked for, so it has no fallback.
if [ "$target" = x86_64 ]; then
    if [ "$portable" = 1 ]; then
        [ -n "$baseline" ] || baseline=x86-64-v3
        [ "$baseline" = x86-64-v3 ] && cpu_confs="x86-64-v3 x86-64-v2" || cpu_confs="x86-64-v2"
    elif [ "$amx" = 1 ]; then cpu_confs="native-amx native x86-64-v3 x86-64-v2"
    else cpu_confs="native x86-64-v3 x86-64-v2"; fi
elif [ -n "$board" ]; then cpu_confs="aarch64-$board"
else cpu_confs="native aarch64-armv8"; fi

# qemu-user's CPU model for each aarch64 preset: it refuses instructions that CPU lacks.
qemu_cpu() {
    case "$1" in aarch64-pi4) echo cortex-a72 ;; aarch64-pi5) echo cortex-a76 ;; *) echo cortex-a53 ;; esac
}

if [ -z "$prefix" ]; then
    if [ "$cross" = 1 ]; then prefix="$HERE/bin/aarch64-$board"; else prefix="$HERE/bin"; fi
fi

# Compilers: the cross toolchain's, or the environment's (cmake's own choice when unset).
cc="${CC:-}" cxx="${CXX:-}"
if [ "$cross" = 1 ]; then cc=aarch64-linux-gnu-gcc cxx=aarch64-linux-gnu-g++; fi

no_amx_flags() {
    # gcc and clang accept -mno-amx-* since 11/12; an older compiler has no AMX to turn off.
    if printf 'int main(void){return 0;}\n' | "${cc:-cc}" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 \
            -x c -c -o /dev/null - >/dev/null 2>&1; then
        echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
}

on_off() { if [ "$1" = "$2" ]; then echo ON; else echo OFF; fi; }

x86_isa() {
    # $1: ON/OFF for SSE42 AVX F16C FMA BMI2 AVX2; AVX-512, AVX-VNNI and AMX always off.
    local on="$1" f
    for f in SSE42 AVX F16C FMA BMI2 AVX2; do
        case " $on " in *" $f "*) flags+=("-DGGML_$f=ON") ;; *) flags+=("-DGGML_$f=OFF") ;; esac
    done
    for f in AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8 AMX_BF16; do
        flags+=("-DGGML_$f=OFF")
    done
}

describe_conf() {
    case "$1" in
        native-amx) echo "this CPU's instructions, AMX included" ;;
        native) if [ "$target" = x86_64 ]; then echo "this CPU's instructions except AMX"; else echo "this CPU's instructions"; fi ;;
        x86-64-v3) echo "the x86-64-v3 baseline (AVX2, FMA, F16C, BMI2)" ;;
        x86-64-v2) echo "the x86-64-v2 baseline (SSE4.2)" ;;
        aarch64-pi4) echo "Raspberry Pi 4 (Cortex-A72, armv8-a+crc)" ;;
        aarch64-pi5) echo "Raspberry Pi 5 (Cortex-A76, armv8.2-a+dotprod+fp16)" ;;
        aarch64-armv8) echo "generic ARMv8.0-A (armv8-a)" ;;
    esac
}

setup_conf() {
    # $1: a CPU configuration. Sets flags, flavor, build_dir, identity and friends for it.
    conf="$1"
    local cpu_cflags="" native=OFF
    case "$conf" in native|native-amx) native=ON ;; esac
    [ "$portable" = 1 ] && native=OFF      # --portable also means every CUDA architecture
    flags=(
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
        -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
        "-DGGML_NATIVE=$native" "-DGGML_CUDA=$(on_off "$accel" cuda)" "-DGGML_METAL=$(on_off "$accel" metal)"
    )
    case "$conf" in
        x86-64-v3) x86_isa "SSE42 AVX F16C FMA BMI2 AVX2" ;;
        x86-64-v2) x86_isa "SSE42" ;;
        aarch64-pi4) flags+=(-DGGML_CPU_ARM_ARCH=armv8-a+crc) ;;
        aarch64-pi5) flags+=(-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16) ;;
        aarch64-armv8) flags+=(-DGGML_CPU_ARM_ARCH=armv8-a) ;;
    esac
    # AMX off in the C/C++ flags (which come before -march=native and still win over it). The same
    # flags for every x86-64 configuration keep the code outside ggml-cpu identical, so ccache serves
    # it to the next configuration and a fallback rebuilds only the CPU kernels.
    [ "$target" = x86_64 ] && [ "$conf" != native-amx ] && cpu_cflags="$(no_amx_flags)"
    flags+=("-DCMAKE_C_FLAGS=$(echo ${CFLAGS:-} $cpu_cflags)" "-DCMAKE_CXX_FLAGS=$(echo ${CXXFLAGS:-} $cpu_cflags)")
    if [ "$cross" = 1 ]; then
        flags+=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
                "-DCMAKE_C_COMPILER=$cc" "-DCMAKE_CXX_COMPILER=$cxx" "-DCMAKE_FIND_ROOT_PATH=$AARCH64_SYSROOT"
                -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY
                -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY)
    fi
    if [ "$static" = 1 ]; then
        flags+=(-DGGML_OPENMP=OFF "-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc")
    fi
    [ "$accel" = metal ] && flags+=(-DGGML_METAL_EMBED_LIBRARY=ON)   # one self-contained binary
    [ "$accel" = vulkan ] && flags+=(-DGGML_VULKAN=ON)
    [ "$accel" = cuda ] && ! command -v nvcc >/dev/null 2>&1 && flags+=("-DCMAKE_CUDA_COMPILER=$nvcc_path")
    [ "$rpc" = 1 ] && flags+=(-DGGML_RPC=ON)
    [ ${#extra[@]} -gt 0 ] && flags+=("${extra[@]}")

    flavor="$accel-$conf"
    [ "$static" = 1 ] && flavor="$flavor-static"
    [ "$rpc" = 0 ] && flavor="$flavor-norpc"
    build_dir="$CACHE/build/$version-$flavor"
    identity="$(sha256_text "source=$version:$src_sha
gguf_edits=$gguf_edits
swa_reuse=$swa_reuse
flags=${flags[*]}
targets=${targets[*]}")"
}

# The GGUF edits hook: how ollama.py runs a GGUF written by Ollama's converter without rewriting it.
# ollama.py writes a sidecar "<file>.edits" (keys to set, arrays to truncate, tensors to rename or
# hide) beside a link to the stored blob; this hook, added to ggml's gguf.cpp, applies it as the header
# is read, for the model (llama.cpp's loader) and the projector (mtmd's) alike. The family knowledge
# stays in ollama.py. Builds of the pinned sdist get it; --source builds the checkout as it is.
gguf_edits_source() {
    cat <<'HOOK'

// ---- ollama.py: GGUF edits (added by build_llama.sh) -------------------------------------------
// A GGUF file F that has a sidecar "F.edits" (itself a GGUF, written by ollama.py) is read as the
// sidecar says, without rewriting F. In this order, from its string arrays: edits.truncate (key,
// count pairs), edits.remove (keys), edits.rename_keys (old, new key-prefix pairs); then every other
// key of the sidecar is set; then edits.rename (old, new tensor-name pairs), edits.shape (name,
// "ne0,ne1,..." pairs: a tensor read as its first rows), edits.data (name, "type,ne0,ne1,...",
// byte ranges triples: a tensor of that ggml type and shape whose bytes are the ranges, in order, each
// "f<offset>+<length>" of F itself or "d<offset>+<length>" of "F.data", a file ollama.py wrote) and
// edits.hide (tensor names). Tensor data offsets into F never change, so mmap and the loaders' own
// reads work as before; edits.data leaves each tensor's ranges as the string key
// "ollama_py.data.<tensor>", which only the projector loader (mtmd's clip.cpp, patched below) reads.
// Only no_alloc reads (all that llama.cpp's loaders do) take edits.
static const char * const GGUF_EDITS_MARKER = "ollama.py gguf edits v2";

// "t,ne0,ne1,..." (or "ne0,ne1,..." when type is null) -> the tensor `view` with that type and shape
// (missing dimensions 1) and its strides recomputed; false when the text or the shape is malformed.
static bool gguf_edits_parse_tensor(const std::string & text, ggml_tensor & view, bool with_type) {
    const char * p = text.c_str();
    char * end = nullptr;
    if (with_type) {
        const long type = strtol(p, &end, 10);
        if (end == p || *end != ',' || type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) == 0) {
            return false;
        }
        view.type = (ggml_type) type;
        p = end + 1;
    }
    for (int d = 0; d < GGML_MAX_DIMS; d++) {
        view.ne[d] = 1;
        if (*p) {
            view.ne[d] = (int64_t) strtoll(p, &end, 10);
            if (end == p || view.ne[d] < 1) {
                return false;
            }
            p = *end == ',' ? end + 1 : end;
        }
    }
    if (*p || view.ne[0] % ggml_blck_size(view.type) != 0) {
        return false;
    }
    view.nb[0] = ggml_type_size(view.type);
    view.nb[1] = view.nb[0] * (view.ne[0] / ggml_blck_size(view.type));
    for (int d = 2; d < GGML_MAX_DIMS; d++) {
        view.nb[d] = view.nb[d - 1] * view.ne[d - 1];
    }
    return true;
}

static std::vector<std::string> gguf_edits_strings(const struct gguf_context * e, const char * key) {
    std::vector<std::string> out;
    const int64_t k = gguf_find_key(e, key);
    if (k >= 0 && gguf_get_kv_type(e, k) == GGUF_TYPE_ARRAY && gguf_get_arr_type(e, k) == GGUF_TYPE_STRING) {
        for (size_t i = 0; i < gguf_get_arr_n(e, k); i++) {
            out.push_back(gguf_get_arr_str(e, k, i));
        }
    }
    return out;
}

static bool gguf_edits_apply(struct gguf_context * ctx, const struct gguf_context * e, const char * fname) {
    const std::vector<std::string> truncate = gguf_edits_strings(e, "edits.truncate");
    for (size_t i = 0; i + 1 < truncate.size(); i += 2) {
        const int64_t k = gguf_find_key(ctx, truncate[i].c_str());
        const size_t n = (size_t) strtoull(truncate[i + 1].c_str(), nullptr, 10);
        if (k < 0 || !ctx->kv[k].is_array || ctx->kv[k].get_ne() < n) {
            GGML_LOG_ERROR("%s: %s.edits: cannot truncate %s to %zu\n", __func__, fname, truncate[i].c_str(), n);
            return false;
        }
        gguf_kv & kv = ctx->kv[k];
        if (kv.type == GGUF_TYPE_STRING) {
            kv.data_string.resize(n);
        } else {
            kv.data.resize(n * gguf_type_size(kv.type));
        }
    }
    for (const std::string & key : gguf_edits_strings(e, "edits.remove")) {
        gguf_remove_key(ctx, key.c_str());
    }
    const std::vector<std::string> rename_keys = gguf_edits_strings(e, "edits.rename_keys");
    for (size_t i = 0; i + 1 < rename_keys.size(); i += 2) {
        for (gguf_kv & kv : ctx->kv) {
            if (kv.key.compare(0, rename_keys[i].size(), rename_keys[i]) == 0) {
                kv.key = rename_keys[i + 1] + kv.key.substr(rename_keys[i].size());
            }
        }
    }
    for (int64_t k = 0; k < gguf_get_n_kv(e); k++) {
        const char * key = gguf_get_key(e, k);
        if (strncmp(key, "edits.", 6) == 0) {
            continue;
        }
        gguf_remove_key(ctx, key);
        ctx->kv.push_back(e->kv[k]);
    }
    const std::vector<std::string> rename = gguf_edits_strings(e, "edits.rename");
    for (size_t i = 0; i + 1 < rename.size(); i += 2) {
        const int64_t t = gguf_find_tensor(ctx, rename[i].c_str());
        if (t < 0 || rename[i + 1].size() >= GGML_MAX_NAME || gguf_find_tensor(ctx, rename[i + 1].c_str()) >= 0) {
            GGML_LOG_ERROR("%s: %s.edits: cannot rename tensor %s to %s\n", __func__, fname, rename[i].c_str(), rename[i + 1].c_str());
            return false;
        }
        ggml_set_name(&ctx->info[t].t, rename[i + 1].c_str());
    }
    const std::vector<std::string> shape = gguf_edits_strings(e, "edits.shape");
    for (size_t i = 0; i + 1 < shape.size(); i += 2) {
        // a tensor read as a prefix of itself (fewer rows): same type, no more bytes than it has
        const int64_t t = gguf_find_tensor(ctx, shape[i].c_str());
        if (t < 0) {
            GGML_LOG_ERROR("%s: %s.edits: no tensor %s to reshape\n", __func__, fname, shape[i].c_str());
            return false;
        }
        ggml_tensor view = ctx->info[t].t;
        const bool parsed = gguf_edits_parse_tensor(shape[i + 1], view, false);
        if (!parsed || view.ne[0] != ctx->info[t].t.ne[0] || ggml_nbytes(&view) > ggml_nbytes(&ctx->info[t].t)) {
            GGML_LOG_ERROR("%s: %s.edits: cannot read tensor %s as %s\n", __func__, fname, shape[i].c_str(), shape[i + 1].c_str());
            return false;
        }
        ctx->info[t].t = view;
    }
    const std::vector<std::string> data = gguf_edits_strings(e, "edits.data");
    for (size_t i = 0; i + 2 < data.size(); i += 3) {
        // bytes gathered from byte ranges: any type and shape (ollama.py chose them from F's tensors)
        const int64_t t = gguf_find_tensor(ctx, data[i].c_str());
        ggml_tensor view = t >= 0 ? ctx->info[t].t : ggml_tensor{};
        bool ok = t >= 0 && gguf_edits_parse_tensor(data[i + 1], view, true);
        size_t total = 0;
        for (const char * p = data[i + 2].c_str(); ok && *p; ) {
            char * end = nullptr;
            ok = (*p == 'f' || *p == 'd') && p[1] >= '0' && p[1] <= '9';
            strtoull(p + 1, &end, 10);
            ok = ok && *end == '+' && end[1] >= '0' && end[1] <= '9';
            total += ok ? (size_t) strtoull(end + 1, &end, 10) : 0;
            ok = ok && (*end == ',' || *end == 0);
            p = ok && *end ? end + 1 : end;
        }
        if (!ok || total != ggml_nbytes(&view)) {
            GGML_LOG_ERROR("%s: %s.edits: cannot read tensor %s as %s from %s\n", __func__, fname,
                           data[i].c_str(), data[i + 1].c_str(), data[i + 2].c_str());
            return false;
        }
        ctx->info[t].t = view;
        gguf_set_val_str(ctx, ("ollama_py.data." + data[i]).c_str(), data[i + 2].c_str());
    }
    for (const std::string & name : gguf_edits_strings(e, "edits.hide")) {
        const int64_t t = gguf_find_tensor(ctx, name.c_str());
        if (t >= 0) {
            ctx->info.erase(ctx->info.begin() + t);
        }
    }
    return true;
}

struct gguf_context * gguf_init_from_file(const char * fname, struct gguf_init_params params) {
    const std::string edits_path = std::string(fname) + ".edits";
    FILE * probe = params.no_alloc ? ggml_fopen(edits_path.c_str(), "rb") : nullptr;
    if (!probe) {
        return gguf_init_from_file_unedited(fname, params);
    }
    fclose(probe);
    const struct gguf_init_params meta_only = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    struct gguf_context * edits = gguf_init_from_file_unedited(edits_path.c_str(), meta_only);
    struct gguf_context * ctx = edits ? gguf_init_from_file_unedited(fname, meta_only) : nullptr;
    const bool ok = ctx && gguf_edits_apply(ctx, edits, fname);
    gguf_free(edits);
    if (!ok) {
        GGML_LOG_ERROR("%s: failed to apply %s (%s)\n", __func__, edits_path.c_str(), GGUF_EDITS_MARKER);
        gguf_free(ctx);
        return nullptr;
    }
    if (params.ctx != nullptr) {
        const struct ggml_init_params pdata = {
            /*mem_size   =*/ (ctx->info.size() + 1) * ggml_tensor_overhead(),
            /*mem_buffer =*/ nullptr,
            /*no_alloc   =*/ true,
        };
        *params.ctx = ggml_init(pdata);
        if (*params.ctx == nullptr) {
            gguf_free(ctx);
            return nullptr;
        }
        for (const gguf_tensor_info & info : ctx->info) {
            ggml_tensor * cur = ggml_new_tensor(*params.ctx, info.t.type, GGML_MAX_DIMS, info.t.ne);
            ggml_set_name(cur, info.t.name);
        }
    }
    return ctx;
}
HOOK
}
# The projector side of edits.data: mtmd's clip.cpp reads tensor bytes itself (seek + read in its own
# file), so its load_tensors reads a tensor the hook marked "ollama_py.data.<tensor>" from a buffer
# gathered from those byte ranges instead. Inserted before load_tensors' "// create data context";
# each read (get_vector's and the weights' loop) picks its stream by the tensor's name. Without such
# keys (every file but ollama.py's views) nothing changes.
clip_data_source() {
    cat <<'CLIP'
        // ---- ollama.py: tensor bytes gathered from byte ranges (added by build_llama.sh; see the GGUF
        // edits hook): "f<offset>+<length>" of this file, "d<offset>+<length>" of "<file>.data", in order
        std::map<std::string, std::string> ollama_py_data;
        for (int64_t i = 0; i < gguf_get_n_tensors(ctx_gguf.get()); ++i) {
            const char * name = gguf_get_tensor_name(ctx_gguf.get(), i);
            const int64_t k = gguf_find_key(ctx_gguf.get(), (std::string("ollama_py.data.") + name).c_str());
            if (k >= 0 && gguf_get_kv_type(ctx_gguf.get(), k) == GGUF_TYPE_STRING) {
                ollama_py_data[name] = gguf_get_val_str(ctx_gguf.get(), k);
                tensor_offset[name] = 0;            // where its bytes start in the gathered buffer
            }
        }
        std::ifstream ollama_py_fin;
        std::stringstream ollama_py_buf;
        auto ollama_py_stream = [&](const std::string & name) -> std::istream & {
            const auto it = ollama_py_data.find(name);
            if (it == ollama_py_data.end()) {
                return fin;
            }
            std::string bytes;
            for (const char * p = it->second.c_str(); *p; ) {
                char * end = nullptr;
                const size_t offset = strtoull(p + 1, &end, 10);
                const size_t length = strtoull(end + 1, &end, 10);
                if (*p == 'd' && !ollama_py_fin.is_open()) {
                    ollama_py_fin = open_ifstream_binary(fname + ".data");
                }
                std::istream & in = *p == 'd' ? (std::istream &) ollama_py_fin : (std::istream &) fin;
                const size_t at = bytes.size();
                bytes.resize(at + length);
                in.clear();
                in.seekg(offset, std::ios::beg);
                in.read(&bytes[at], length);
                if (!in) {
                    throw std::runtime_error(string_format("%s: cannot read %s from %s (%s)\n", __func__,
                        name.c_str(), fname.c_str(), it->second.c_str()));
                }
                p = *end ? end + 1 : end;
            }
            ollama_py_buf.str(bytes);
            ollama_py_buf.clear();
            return ollama_py_buf;
        };
        // ---- end ollama.py
CLIP
}
gguf_edits="v2:$(sha256_text "$(gguf_edits_source)$(clip_data_source)" | cut -c1-16)"

# The sliding-window reuse fix: llama-server's reuse check for a sliding-window model (Gemma 2 and 3,
# gpt-oss...) asks that the cache start before pos_next - n_swa, one cell earlier than the next token
# reads (it attends to positions p with pos_next - p < n_swa: llama_hparams::is_masked_swa). A live
# cache never shows the difference, but a slot restored from a file holds exactly the window
# (llama_kv_cache::state_write keeps the cells the last token could see, pos_max - n_swa + 1 on),
# which starts at pos_next - n_swa when the new prompt extends the saved one: unpatched, every token is
# computed again (ollama.py's prompt cache, PromptCache). Only for a cache that can drop a sequence's
# tail (seq_rm type PART): a recurrent state's pos_min means something else. ollama.py reads the
# build-info's swa_reuse line to know an engine reuses restored windows.
SWA_REUSE_LINE='                                if (pos_min >= pos_min_thold) {'
SWA_REUSE_NEW='                                if (pos_min >= pos_min_thold + (n_swa > 0 \&\& ctx_tgt_seq_rm_type == COMMON_CONTEXT_SEQ_RM_TYPE_PART ? 1 : 0)) { \/\/ ollama.py swa reuse v1'
swa_reuse="v1:$(sha256_text "$SWA_REUSE_NEW" | cut -c1-16)"

targets=(llama-server llama-quantize)      # llama-quantize: create --quantize
[ "$rpc" = 1 ] && targets+=(ggml-rpc-server)    # installed as rpc-server: ollama.py worker

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
    gguf_edits="none (--source builds the checkout as it is)"
    swa_reuse="none (--source builds the checkout as it is)"
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

info="$prefix/llama-server.build-info"
# The request's identity: source, the first CPU configuration's flags, targets and whether it is checked.
# A fallback install records the request it answered, so asking again is still a no-op.
setup_conf "${cpu_confs%% *}"
request="$(sha256_text "$identity check=$check check_with=$check_with")"

already_built() {
    [ -n "$src_sha" ] || return 1            # a non-git checkout: let cmake decide what is stale
    [ -f "$info" ] && grep -qx "identity: $request" "$info" || return 1
    for t in "${targets[@]}"; do [ -x "$prefix/${t#ggml-}" ] || return 1; done
}

install_launcher() {
    # bin/ollama: ollama.py imported as a module, so Python runs its cached bytecode instead of compiling
    # the whole file at every start as it does for a script (~130 ms here). The bytecode is written now,
    # explicitly, since PYTHONDONTWRITEBYTECODE stops Python from writing it itself; a stale or unwritable
    # cache only makes the command as slow as `python3 ollama.py`. Not for cross builds' prefixes.
    # It runs the interpreter the cache is compiled for, by its own path: `python3` may be a wrapper
    # (pyenv's shim is a bash script, ~65 ms a start here), and the cache is per Python version; plain
    # `python3` if that one is gone. -S: ollama.py imports only the standard library, so `site`
    # (site-packages and their .pth files, run at every start) is not needed. The script's own path is
    # the first argument (its directory goes on sys.path), so `ps` shows ".../ollama.py serve" and
    # `pgrep -f "ollama.py serve"` finds serve started either way.
    [ "$cross" = 0 ] && [ -f "$HERE/ollama.py" ] || return 0
    local py launcher="$HERE/bin/ollama"
    py="$(command -v python3)" || return 0
    py="$("$py" -c 'import sys; print(sys.executable)' 2>/dev/null)" && [ -x "$py" ] || py="$(command -v python3)"
    mkdir -p "$HERE/bin"
    cat > "$launcher.tmp.$$" <<LAUNCHER
#!/bin/sh
# written by build_llama.sh: \`ollama ARGS\` is \`python3 ollama.py ARGS\`, from cached bytecode
py='$py'
[ -x "\$py" ] || py=python3
exec "\$py" -S -c 'import os, sys; sys.path.insert(0, os.path.dirname(sys.argv.pop(1))); import ollama; sys.exit(ollama.main())' \\
    "$HERE/ollama.py" "\$@"
LAUNCHER
    chmod 755 "$launcher.tmp.$$" && mv -f "$launcher.tmp.$$" "$launcher"
    "$py" -c 'import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)' "$HERE/ollama.py" 2>/dev/null \
        || note "could not write ollama.py's bytecode cache; bin/ollama works, only slower"
}

if [ "$force" = 0 ] && already_built; then
    install_launcher
    installed="$(sed -n 's/^cpu_config: //p' "$info" | head -1)"
    echo "already built $prefix/llama-server from $src_desc ($accel, ${installed:-$conf}) (nothing to do; --force rebuilds)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------
[ -z "$accel_note" ] || note "$accel_note"
command -v cmake >/dev/null 2>&1 || install_hint cmake
if [ "$cross" = 1 ]; then
    command -v "$cc" >/dev/null 2>&1 && command -v "$cxx" >/dev/null 2>&1 || die "$cxx not found: a cross build
  needs Debian's aarch64 toolchain: sudo apt-get install crossbuild-essential-arm64"
else
    cc_ok=0
    for c in "${CC:-}" cc gcc clang; do [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { cc_ok=1; break; }; done
    [ "$cc_ok" = 1 ] || install_hint "a C compiler (cc, gcc or clang)"
    cxx_ok=0
    for c in "${CXX:-}" c++ g++ clang++; do [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { cxx_ok=1; break; }; done
    [ "$cxx_ok" = 1 ] || install_hint "a C++ compiler (c++, g++ or clang++)"
fi

# The check: ollama.py (beside this script) runs the binary, natively or under an emulator.
check_cmd=()
if [ "$check" = 1 ]; then
    py="$(command -v python3 || command -v python)" || die "python3 is needed to check the build (or --no-check)"
    [ -f "$HERE/ollama.py" ] || die "$HERE/ollama.py not found: it checks the build (or --no-check)"
    check_cmd=("$py" "$HERE/ollama.py" check-engine)
    if [ -z "$check_with" ] && [ "$cross" = 1 ]; then
        command -v qemu-aarch64 >/dev/null 2>&1 || die "qemu-aarch64 not found: checking a cross build needs
  Debian's qemu-user: sudo apt-get install qemu-user (or --no-check to install it unchecked)"
        check_with="qemu-aarch64 -cpu $(qemu_cpu "aarch64-$board") -L $AARCH64_SYSROOT"
    fi
    if [ "$accel" = cuda ] && ! have_nvidia_driver; then
        note "no NVIDIA driver here: a CUDA build cannot run on this machine, so it is installed unchecked"
        check=0
    fi
fi
launcher=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

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

add_gguf_edits() {
    # Adds the hook to $src_tree's gguf.cpp (kept pristine as gguf.cpp.ollama-py-orig; rewritten only
    # when the result differs, so cmake and ccache see an unchanged file as unchanged).
    local f="$src_tree/ggml/src/gguf.cpp" orig new
    orig="$f.ollama-py-orig"
    [ -f "$orig" ] || cp "$f" "$orig"
    new="$f.tmp.$$"
    sed 's/^struct gguf_context \* gguf_init_from_file(const char \* fname, struct gguf_init_params params) {$/static struct gguf_context * gguf_init_from_file_unedited(const char * fname, struct gguf_init_params params) {/' \
        "$orig" > "$new"
    grep -q '^static struct gguf_context \* gguf_init_from_file_unedited' "$new" \
        || { rm -f "$new"; die "$f: gguf_init_from_file not found where the GGUF edits hook expects it"; }
    gguf_edits_source >> "$new"
    if cmp -s "$new" "$f"; then rm -f "$new"; else mv -f "$new" "$f"; fi
}
add_clip_data() {
    # Adds clip_data_source to $src_tree's tools/mtmd/clip.cpp (pristine copy clip.cpp.ollama-py-orig;
    # rewritten only when it differs). Each anchor is checked: a llama.cpp whose clip.cpp moved fails here.
    local f="$src_tree/tools/mtmd/clip.cpp" orig new ins
    orig="$f.ollama-py-orig"
    [ -f "$orig" ] || cp "$f" "$orig"
    new="$f.tmp.$$" ins="$f.ins.$$"
    clip_data_source > "$ins"
    [ "$(grep -c '^        // create data context$' "$orig")" = 1 ] \
        && [ "$(grep -c '^            fin.seekg(it->second, std::ios::beg);$' "$orig")" = 1 ] \
        && [ "$(grep -c '^                    fin.seekg(offset, std::ios::beg);$' "$orig")" = 1 ] \
        || { rm -f "$ins"; die "$f: load_tensors is not where the projector's tensor-data edit expects it"; }
    awk -v ins="$ins" '
        /^        \/\/ create data context$/ { while ((getline line < ins) > 0) print line; close(ins) }
        /^            fin.seekg\(it->second, std::ios::beg\);$/ { print "            std::istream & fin = ollama_py_stream(name);" }
        /^                    fin.seekg\(offset, std::ios::beg\);$/ { print "                    std::istream & fin = ollama_py_stream(t->name);" }
        { print }' "$orig" > "$new"
    rm -f "$ins"
    [ "$(grep -c 'ollama_py_stream(' "$new")" = 2 ] || { rm -f "$new"; die "$f: the projector's tensor-data edit did not apply"; }
    if cmp -s "$new" "$f"; then rm -f "$new"; else mv -f "$new" "$f"; fi
}
[ "$src_kind" = dir ] || { add_gguf_edits; add_clip_data; }

add_swa_reuse() {
    # Applies the sliding-window reuse fix (see SWA_REUSE_LINE) to $src_tree's server-context.cpp the
    # same way: from the pristine copy, the one line checked with grep, rewritten only when it differs.
    local f="$src_tree/tools/server/server-context.cpp" orig new
    orig="$f.ollama-py-orig"
    [ -f "$orig" ] || cp "$f" "$orig"
    [ "$(grep -cxF "$SWA_REUSE_LINE" "$orig")" = 1 ] \
        || { die "$f: the sliding-window reuse check is not where the patch expects it"; }
    new="$f.tmp.$$"
    sed "s/^$SWA_REUSE_LINE\$/$SWA_REUSE_NEW/" "$orig" > "$new"
    grep -q '// ollama.py swa reuse v1$' "$new" \
        || { rm -f "$new"; die "$f: the sliding-window reuse patch did not apply"; }
    if cmp -s "$new" "$f"; then rm -f "$new"; else mv -f "$new" "$f"; fi
}
[ "$src_kind" = dir ] || add_swa_reuse

# ---------------------------------------------------------------------------------------------------
# Configure, build, check, install
# ---------------------------------------------------------------------------------------------------
build_conf() {
    # Configure (only when the flags changed; cmake --build re-runs it itself when CMakeLists change)
    # and build the current configuration; sets built_secs.
    local started flags_stamp
    started=$(date +%s)
    mkdir -p "$build_dir"
    flags_stamp="$build_dir/.ollama-py-flags"
    if [ ! -f "$build_dir/CMakeCache.txt" ] || [ ! -f "$flags_stamp" ] || [ "$(cat "$flags_stamp")" != "${flags[*]} ${launcher[*]:-}" ]; then
        note "configuring $build_dir"
        cmake -S "$src_tree" -B "$build_dir" "${flags[@]}" ${launcher[@]+"${launcher[@]}"}
        printf '%s' "${flags[*]} ${launcher[*]:-}" > "$flags_stamp"
    fi
    note "building ${targets[*]} ($flavor: $(describe_conf "$conf"), $jobs jobs)"
    cmake --build "$build_dir" --config Release --target "${targets[@]}" -j "$jobs"
    built_secs=$(( $(date +%s) - started ))
}

built_binary() {
    # $1: target name; prints its path in the build dir.
    local cand
    for cand in "$build_dir/bin/$1" "$build_dir/bin/Release/$1"; do [ -x "$cand" ] && { echo "$cand"; return; }; done
    die "build finished but $1 is not in $build_dir/bin"
}

run_check() {
    # Runs the check on the built binary; sets check_out (its last line) and returns its status.
    local args=(--engine "$(built_binary llama-server)") log
    [ -n "$check_with" ] && args+=(--exec "$check_with")
    log="$build_dir/check.log"
    note "checking: ${check_cmd[*]} ${args[*]}"
    if "${check_cmd[@]}" "${args[@]}" >"$log" 2>&1; then
        check_out="$(tail -n 1 "$log")"
        return 0
    fi
    check_out="$(grep -m1 '^Error: ' "$log" || tail -n 1 "$log")"
    check_out="${check_out#Error: }"
    return 1
}

history=()
installed_conf=""
for try_conf in $cpu_confs; do
    setup_conf "$try_conf"
    if [ ${#history[@]} -gt 0 ]; then
        note "rebuilding with $(describe_conf "$conf") ($flavor)"
    fi
    build_conf
    if [ "$check" = 0 ]; then
        check_out="not run (--no-check)"
        [ "$accel" = cuda ] && ! have_nvidia_driver && check_out="not run (no NVIDIA driver on the build machine)"
        installed_conf="$conf"
        break
    fi
    if run_check; then
        note "check passed: $check_out"
        installed_conf="$conf"
        break
    fi
    echo "build_llama.sh: the $flavor build failed its check: $check_out" >&2
    echo "  (full output: $build_dir/check.log)" >&2
    history+=("$conf: $check_out")
done
if [ -z "$installed_conf" ]; then
    die "no CPU configuration passed the check; nothing was installed (tried: $cpu_confs; logs in $CACHE/build/)"
fi
[ ${#history[@]} -eq 0 ] || note "installed the $flavor build: $(describe_conf "$conf"), after ${#history[@]} failed configuration(s)"

mkdir -p "$prefix"
for t in "${targets[@]}"; do
    out="$(built_binary "$t")" name="${t#ggml-}"      # cmake's ggml-rpc-server is rpc-server to users
    # Copy then rename, so a running llama-server is never overwritten in place.
    cp "$out" "$prefix/.$name.tmp.$$"
    mv -f "$prefix/.$name.tmp.$$" "$prefix/$name"
done

cxx_used="$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build_dir/CMakeCache.txt" | head -1)"
compiler="$("${cxx_used:-c++}" --version 2>/dev/null | head -1 || true)"
{
    echo "# written by build_llama.sh; the identity line decides whether a rebuild is needed"
    echo "identity: $request"
    echo "source: $src_desc"
    [ "$src_kind" = dir ] || echo "source_sha256: $src_sha"
    [ "$src_kind" = dir ] && echo "source_revision: ${src_sha:-unknown (not a git checkout)}"
    echo "source_tree: $src_tree"
    echo "gguf_edits: $gguf_edits"
    echo "swa_reuse: $swa_reuse"
    echo "target: $target$([ "$cross" = 1 ] && echo " (cross-built on $host_arch)")"
    echo "flavor: $flavor"
    echo "cpu_config: $conf"
    echo "cpu_config_means: $(describe_conf "$conf")"
    for h in ${history[@]+"${history[@]}"}; do echo "fallback_from: $h"; done
    echo "check: $check_out"
    [ -n "$check_with" ] && echo "check_with: $check_with"
    echo "static: $([ "$static" = 1 ] && echo "libstdc++ and libgcc linked in, no OpenMP" || echo no)"
    echo "cmake_flags: ${flags[*]}"
    echo "targets: ${targets[*]}"
    echo "compiler: ${compiler:-unknown}"
    echo "build_dir: $build_dir"
    echo "build_seconds: $built_secs"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$info.tmp.$$"
mv -f "$info.tmp.$$" "$info"

install_launcher
echo "built $prefix/llama-server from $src_desc ($flavor) in ${built_secs}s; check: $check_out"
exit 0
}
