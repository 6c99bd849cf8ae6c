#!/usr/bin/env bash
# One entry point for a fresh Debian machine with Python 3.11.
#
#   ./dev.sh demo [sct demo options]   set up, then train → export → index → eval → serve on Fashion-MNIST
#   ./dev.sh test [pytest options]     set up, then run the whole test suite
#   ./dev.sh setup                     only create .venv and install (CPU build of FAISS and ONNX Runtime)
#
# Setup creates .venv at the repository root and installs the project with the
# pinned torch/torchvision of constraints.txt. It re-runs only when
# pyproject.toml or constraints.txt change. Debian packages it needs are
# installed with apt-get when it runs as root (or with passwordless sudo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
    local missing=()
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; else
            say "please install the Debian package(s) ${missing[*]} (apt-get install ${missing[*]}) and rerun"
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null; then
        say "no apt-get here: install ${missing[*]} with your package manager"
        return 1
    fi
    say "installing Debian package(s): ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; "$PYTHON" -m venv "$VENV"; }
    fi
    local stamp
    stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        say "installing sct-retrieval and its dependencies into $VENV (torch takes a few minutes the first time)"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[cpu,test]"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    demo)
        # Fashion-MNIST from Debian; without apt, `sct demo` falls back to torchvision's downloader.
        [ -d /usr/share/datasets/fashion-mnist ] || apt_install dataset-fashion-mnist || true
        setup
        exec "$VENV/bin/sct" demo "$@"
        ;;
    test)
        # Debian's Chromium for the real-browser tests; without it those tests skip and say why.
        [ -x /usr/bin/chromium ] || apt_install chromium || true
        # curl: a test uploads photos the way people do, with `curl -F image=@photo.jpg`.
        command -v curl >/dev/null || apt_install curl || true
        # Fonts that benchmarks/zero_shot_sets.py draws its many-class image sets with (glyphs, emoji).
        [ -d /usr/share/fonts/truetype/liberation ] && [ -d /usr/share/fonts/truetype/dejavu ] \
            || apt_install fonts-dejavu-core fonts-dejavu-extra fonts-liberation || true
        [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || apt_install fonts-noto-color-emoji || true
        # torch.compile's CPU backend (the --compile test) builds C++ against the Python headers.
        command -v g++ >/dev/null || apt_install g++ || true
        "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
            || apt_install python3-dev || true
        setup
        # lint and format first (pyproject.toml's [tool.ruff]): a second or two
        "$VENV/bin/ruff" check --quiet . && "$VENV/bin/ruff" format --check --quiet . \
            || { echo "ruff: fix with .venv/bin/ruff check --fix . && .venv/bin/ruff format ." >&2; exit 1; }
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    setup)
        setup
        ;;
    *)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
