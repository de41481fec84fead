#!/usr/bin/env bash
# System packages some tests use, installed where this script can (Debian/Ubuntu as root);
# elsewhere it says what is missing and the tests that need it skip with the reason.
#   xvfb, xdotool: the desktop app's window tests (a virtual display, typing like a user)
#   clang:         the Metal shim (compiles the kernel bodies like the Metal compiler does)
set -uo pipefail
need=()
command -v Xvfb >/dev/null || need+=(xvfb)
command -v xdotool >/dev/null || need+=(xdotool)
command -v clang >/dev/null || need+=(clang)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "install-test-deps: apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; } \
        || echo "install-test-deps: could not install ${need[*]}; the tests that need them will skip"
else
    echo "install-test-deps: not installed: ${need[*]} (the tests that need them will skip)"
fi
exit 0
