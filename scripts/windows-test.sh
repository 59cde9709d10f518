#!/usr/bin/env bash
# Cross-compiles handover's test suites for x86_64-pc-windows-gnu and runs
# them under Wine. Installs what it needs (idempotently). Called by .ci/run.
#
# Debian's rustc-web (1.96) ships the std sources, so std itself is built for
# the target with -Zbuild-std (RUSTC_BOOTSTRAP=1); rustup's toolchain comes
# first in PATH, so Debian's cargo, rustc and rustdoc are named explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 wine64 wine)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export WINEDEBUG=-all
export WINEPREFIX="${WINEPREFIX:-$PWD/target/wine-prefix}"
if [ ! -f "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll" ]; then
    echo "== preparing the Wine prefix $WINEPREFIX"
    wineboot --init >/dev/null 2>&1 || true
    x86_64-w64-mingw32-gcc -shared -O2 -o target/bcryptprimitives.dll scripts/windows/bcryptprimitives.c
    cp target/bcryptprimitives.dll "$WINEPREFIX/drive_c/windows/system32/"
fi

export RUSTC_BOOTSTRAP=1
export RUSTC=/usr/bin/rustc
export RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine
echo "== cargo test for x86_64-pc-windows-gnu under $(wine --version)"
# A test that fails can leave Windows processes behind, and `wine` waits
# for them: bound the whole run, and end every Wine process afterwards.
trap 'wineserver -k >/dev/null 2>&1 || true' EXIT
timeout --kill-after=30 "${HANDOVER_WINDOWS_TIMEOUT:-1500}" /usr/bin/cargo test \
    -Zbuild-std=std,panic_abort \
    --target x86_64-pc-windows-gnu \
    --target-dir "${HANDOVER_WINDOWS_TARGET_DIR:-target/windows}" \
    -p handover -p handover-cli "$@"
