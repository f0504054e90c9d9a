# Sourced by quickstart.sh, test.sh and .ci/run: what a fresh Debian/Ubuntu machine lacks to
# build podgate. pingora-core builds zlib-ng with cmake and a C compiler.
ensure_build_deps() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v cc >/dev/null 2>&1 || missing+=(gcc)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (needed to build pingora)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "podgate needs ${missing[*]} to build: install them (e.g. sudo apt-get install -y ${missing[*]})" >&2
    return 1
  fi
}
