#!/usr/bin/env bash
# Install the Debian packages the offline default data needs (Noto Color Emoji + Unicode data),
# when they are missing. As root this runs apt-get; otherwise it prints the command to run.
set -euo pipefail
need=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || need+=(unicode-data)
if [ "${1:-}" = "--clipart" ]; then
  [ -d /usr/share/openclipart/png ] || need+=(openclipart-png)
  [ -d /usr/share/openclipart/svg ] || need+=(openclipart-svg)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Debian packages: ${need[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
else
  echo "error: missing Debian packages: ${need[*]}" >&2
  echo "       install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
