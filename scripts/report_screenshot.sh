#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium to a PNG, to look at the page as a user
# would (layout, panels, tables) without a desktop. Needs chromium (Debian: apt install chromium).
#   scripts/report_screenshot.sh runs/tiny /tmp/report.png [HEIGHT]
set -euo pipefail
workdir=$(cd "$1" && pwd)
out=$2
height=${3:-5200}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "error: no chromium on PATH; install it (Debian/Ubuntu: apt install chromium)" >&2
  exit 2
fi
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size=1400,"$height" --screenshot="$out" "file://$workdir/report.html" 2>/dev/null
echo "wrote $out"
