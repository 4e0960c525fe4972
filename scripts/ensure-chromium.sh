#!/usr/bin/env bash
# Makes sure Chromium is installed for the browser test (tests/api/browser.rs), which runs
# the canvas's requests in a real headless browser and fails, never skips, without one.
# Idempotent: returns at once when `chromium` (or $CHROMIUM) is already there; otherwise
# installs Debian's `chromium` package (about a minute; needs root or sudo).
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: $CHROMIUM is missing and apt-get is not available; install Chromium and set CHROMIUM=/path/to/chromium" >&2
  exit 1
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
echo "ensure-chromium: installing Debian's chromium (about a minute, once)"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
if [ ! -x "$CHROMIUM" ]; then
  echo "ensure-chromium: installed the chromium package but $CHROMIUM is still missing" >&2
  exit 1
fi
"$CHROMIUM" --version
