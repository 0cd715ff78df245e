#!/usr/bin/env bash
# Install the Debian packages the offline default data needs (Noto Color Emoji + Unicode data;
# WordNet for pseudo-labels from captions)
# and, with --test, what the concept-browser test needs (headless Chromium + its chromedriver,
# driven by Selenium), when they are missing. As root this runs apt-get; otherwise it prints the command to run.
set -euo pipefail
need=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || need+=(unicode-data)
# WordNet 3.0 for data.labels_from: captions (docs/unlabeled.md) and its tests.
[ -f /usr/share/wordnet/cntlist.rev ] || need+=(wordnet-base)
for arg in "$@"; do
  case "$arg" in
    --test)  # the concept-browser test (make test)
      [ -x /usr/bin/chromium ] || need+=(chromium)
      [ -x /usr/bin/chromedriver ] || need+=(chromium-driver) ;;
    --clipart)
      [ -d /usr/share/openclipart/png ] || need+=(openclipart-png)
      [ -d /usr/share/openclipart/svg ] || need+=(openclipart-svg) ;;
    *) echo "usage: $0 [--test] [--clipart]" >&2; exit 2 ;;
  esac
done
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
