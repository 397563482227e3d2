#!/usr/bin/env bash
# Fetch the Swagger UI and ReDoc bundles that /docs and /redoc serve (src/spellbook/server/static/vendor).
set -euo pipefail
SWAGGER=5.32.0
REDOC=2.5.0
here=$(cd "$(dirname "$0")/.." && pwd)
target="$here/src/spellbook/server/static/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack "swagger-ui-dist@$SWAGGER" "redoc@$REDOC" >/dev/null
mkdir swagger redoc
tar xzf "swagger-ui-dist-$SWAGGER.tgz" -C swagger
tar xzf "redoc-$REDOC.tgz" -C redoc
cp swagger/package/{swagger-ui-bundle.js,swagger-ui.css,favicon-32x32.png,swagger-ui-bundle.js.LICENSE.txt} "$target/"
cp swagger/package/LICENSE "$target/LICENSE.swagger-ui"
cp swagger/package/NOTICE "$target/NOTICE.swagger-ui"
cp redoc/package/bundles/{redoc.standalone.js,redoc.standalone.js.LICENSE.txt} "$target/"
cp redoc/package/LICENSE "$target/LICENSE.redoc"
echo "vendored swagger-ui-dist $SWAGGER and redoc $REDOC into $target"
