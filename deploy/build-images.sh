#!/usr/bin/env bash
# Builds gangway and gangway-whoami as static binaries on this host and wraps each one in a
# FROM-scratch image (the `from-host` targets of deploy/Dockerfile and deploy/Dockerfile.whoami).
# No base image is pulled, so this works without registry access.
#
#   deploy/build-images.sh                         # gangway:local and gangway-whoami:local
#   GANGWAY_IMAGE=gangway:dev deploy/build-images.sh
#
# Environment:
#   GANGWAY_IMAGE      tag of the proxy image (default gangway:local)
#   WHOAMI_IMAGE       tag of the demo app image (default gangway-whoami:local)
#   STATIC_TARGET_DIR  cargo target dir of the static build (default target/static: apart from
#                      target/ so it never waits on another cargo's lock or evicts its cache)
#   SKIP_CARGO=1       package the binaries already built there
set -euo pipefail
cd "$(dirname "$0")/.."

gangway_image=${GANGWAY_IMAGE:-gangway:local}
whoami_image=${WHOAMI_IMAGE:-gangway-whoami:local}
target_dir=${STATIC_TARGET_DIR:-target/static}
triple="$(uname -m)-unknown-linux-gnu"
bin_dir="$target_dir/$triple/release"
ca_bundle=/etc/ssl/certs/ca-certificates.crt

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'build-images: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (docker info failed)"
[ -r "$ca_bundle" ] || die "no CA bundle at $ca_bundle (apt-get install ca-certificates)"

if [ "${SKIP_CARGO:-}" != 1 ]; then
  unset CARGO_ENCODED_RUSTFLAGS   # it would take precedence over RUSTFLAGS
  say "static build: cargo build --release --target $triple (RUSTFLAGS=-C target-feature=+crt-static)"
  # An explicit --target keeps crt-static off build scripts and proc macros (they must stay
  # dynamic to be loaded by the compiler).
  RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target_dir" \
    "${CARGO:-cargo}" build --release --locked --target "$triple" --bin gangway --bin gangway-whoami
fi

for bin in gangway gangway-whoami; do
  [ -x "$bin_dir/$bin" ] || die "$bin_dir/$bin is missing (run without SKIP_CARGO=1)"
  # A dynamic binary would not start in an empty image: it asks for an ELF interpreter.
  if LC_ALL=C readelf -lW "$bin_dir/$bin" 2>/dev/null | grep -q 'program interpreter'; then
    die "$bin_dir/$bin is dynamically linked; it would not run FROM scratch"
  fi
done

# Minimal build contexts: the classic builder uploads the whole context folder.
ctx="$target_dir/image-context"
rm -rf "$ctx"
mkdir -p "$ctx/gangway/storage" "$ctx/whoami"
cp "$bin_dir/gangway" "$ctx/gangway/gangway"
cp "$ca_bundle" "$ctx/gangway/ca-certificates.crt"
cp "$bin_dir/gangway-whoami" "$ctx/whoami/gangway-whoami"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

build() { # image dockerfile context
  local image=$1 dockerfile=$2 context=$3 old new
  old=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  say "docker build --target from-host -t $image ($dockerfile)"
  docker build --target from-host -f "$dockerfile" -t "$image" \
    --label "org.opencontainers.image.title=${image%%:*}" \
    --label "org.opencontainers.image.version=$version" \
    "$context"
  new=$(docker image inspect -f '{{.Id}}' "$image")
  # Each rebuild leaves the previous image untagged: remove it unless a container uses it.
  if [ -n "$old" ] && [ "$old" != "$new" ]; then
    docker image rm "$old" >/dev/null 2>&1 || true
  fi
}
build "$gangway_image" deploy/Dockerfile "$ctx/gangway"
build "$whoami_image" deploy/Dockerfile.whoami "$ctx/whoami"

say "smoke test: both binaries start in their empty images"
docker run --rm --network none "$gangway_image" --version
docker run --rm --network none "$whoami_image" --help >/dev/null
say "built $gangway_image and $whoami_image"
