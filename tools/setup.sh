#!/bin/sh
# Installs the Debian 12 packages kvd needs to build and test. Idempotent; run as root or with sudo.
set -eu

PKGS="meson ninja-build pkg-config gcc python3 \
  libvulkan-dev glslc mesa-vulkan-drivers vulkan-validationlayers vulkan-tools \
  libuv1-dev libmsgpack-dev libinih-dev libxxhash-dev libedit-dev libpcre2-dev libsystemd-dev \
  libcjson-dev python3-msgpack python3-pynvim systemd groff-base man-db \
  clang libfuzzer-14-dev libclang-rt-14-dev"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
else
  echo "setup: all packages present"
fi
