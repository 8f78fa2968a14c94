#!/usr/bin/env bash
# Runs the build commands of deploy/docker/Dockerfile outside docker (CI has no docker
# engine), then checks what the runtime stage relies on:
#   1. `cargo build --release --locked`      (the builder stage's RUN, same flags)
#   2. the binary answers `--version` with the version in Cargo.toml
#   3. the binary needs no shared library that debian:bookworm-slim lacks
#      (the runtime stage installs nothing: glibc, libgcc_s, libm only)
# Run from the repository root: bash deploy/docker/build-steps.sh
set -euo pipefail

cd "$(dirname "$0")/../.."
[ -f Cargo.toml ] && [ -f Cargo.lock ] || { echo "build-steps: run inside the edge-router repo (Cargo.toml and Cargo.lock needed)" >&2; exit 1; }

# The command must stay identical to the Dockerfile's; fail loudly if they drift apart.
build_cmd=(cargo build --release --locked)
if ! grep -qF "${build_cmd[*]}" deploy/docker/Dockerfile; then
  echo "build-steps: FAIL deploy/docker/Dockerfile no longer runs '${build_cmd[*]}'; keep the two in step" >&2
  exit 1
fi

echo "build-steps: ${build_cmd[*]}"
"${build_cmd[@]}"

bin=target/release/edge-router
[ -x "$bin" ] || { echo "build-steps: FAIL $bin was not built" >&2; exit 1; }

want_version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
got=$("$bin" --version 2>&1) || { echo "build-steps: FAIL '$bin --version' exited non-zero: $got" >&2; exit 1; }
case "$got" in
  *"$want_version"*) echo "build-steps: ok '$bin --version' -> $got" ;;
  *) echo "build-steps: FAIL '$bin --version' printed '$got', expected it to contain $want_version" >&2; exit 1 ;;
esac

# Shared libraries present in debian:bookworm-slim without installing anything.
allowed='^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1)$'
needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
bad=$(printf '%s\n' "$needed" | grep -Ev "$allowed" || true)
if [ -n "$bad" ]; then
  echo "build-steps: FAIL $bin needs libraries the bookworm-slim runtime stage lacks: $(echo $bad)" >&2
  exit 1
fi
echo "build-steps: ok shared libraries all in bookworm-slim: $(echo $needed)"
echo "build-steps: PASS"
