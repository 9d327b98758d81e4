#!/usr/bin/env bash
# Fetches the official Tarko web UI (npm @tarko/agent-ui-builder 0.3.0, its prebuilt static/
# folder) into webui/ (git-ignored), checked against the registry's published integrity.
#
#   scripts/fetch-webui.sh            # then: supervisor --webui-static-path webui/static
#                                     #   or: webui.staticPath = "webui/static" in the config
#
# `npm pack` fetches only the package tarball: `npm install` would also resolve the package's
# dependency @tarko/interface, which the UI's static files do not need (and which some
# registries do not carry). Re-running is quiet and does nothing when the UI is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

package="@tarko/agent-ui-builder"
version="0.3.0"
# dist.integrity of $package@$version on registry.npmjs.org.
integrity="sha512-sfUcF6YndSTnDh3QyIzBao24yHwWez+ZdLgS0dVxgX3fCd8f/ww6satMpvsnKESPx4WRUI3uUXZMUwdA7OlZIA=="
dest="webui"
stamp="$dest/.version"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$package@$version" ] && [ -f "$dest/static/index.html" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-webui: npm is required (Node.js 20+)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-webui: fetching $package@$version"
tarball="$(cd "$tmp" && npm pack --silent "$package@$version" 2>/dev/null | tail -n 1)"
[ -f "$tmp/$tarball" ] || { echo "fetch-webui: npm pack $package@$version failed" >&2; exit 1; }

actual="sha512-$(openssl dgst -sha512 -binary "$tmp/$tarball" 2>/dev/null | base64 -w0 || true)"
if [ "$actual" = "sha512-" ]; then
  actual="sha512-$(node -e 'const c=require("crypto");process.stdout.write(c.createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$tmp/$tarball")"
fi
if [ "$actual" != "$integrity" ]; then
  echo "fetch-webui: integrity mismatch for $tarball" >&2
  echo "  expected $integrity" >&2
  echo "  got      $actual" >&2
  exit 1
fi

mkdir -p "$tmp/unpacked"
tar -xzf "$tmp/$tarball" -C "$tmp/unpacked"
[ -f "$tmp/unpacked/package/static/index.html" ] || { echo "fetch-webui: the package has no static/index.html" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest"
mv "$tmp/unpacked/package/static" "$dest/static"
cp "$tmp/unpacked/package/package.json" "$dest/package.json"
echo "$package@$version" > "$stamp"
echo "fetch-webui: the official web UI is in $dest/static"
