#!/bin/sh
# Refresh app/static/swagger/ (what /docs loads) from the npm package swagger-ui-dist:
#   scripts/vendor_swagger_ui.sh 5.35.0
# The files are served by craftserve itself, so /docs works offline and runs no third-party
# script where the page keeps the key. Only the files /docs needs are kept, with the license.
set -eu
version=${1:?give the swagger-ui-dist version, e.g. 5.35.0}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$version" >/dev/null && tar xzf swagger-ui-dist-*.tgz)
dest="$here/app/static/swagger"
mkdir -p "$dest"
for f in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css favicon-32x32.png LICENSE NOTICE; do
  cp "$work/package/$f" "$dest/$f"
done
printf 'swagger-ui-dist %s (npm), unmodified: %s\n' "$version" \
  "swagger-ui-bundle.js swagger-ui.css favicon-32x32.png; license: LICENSE, NOTICE" > "$dest/VERSION"
(cd "$dest" && sha256sum swagger-ui-bundle.js swagger-ui.css favicon-32x32.png >> VERSION)
cat "$dest/VERSION"
