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

# Sourced by test.sh (and so by .ci/run): the rate-limit tests start real Redis servers and
# clusters (tests/support/redis.rs), so the suite needs Debian's redis-server (with TLS) and
# redis-cli (redis-tools). Those tests fail, naming it, when it is missing.
ensure_test_deps() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server redis-tools (the rate-limit tests start real Redis servers)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  else
    echo "the rate-limit tests need redis-server and redis-cli: install them (e.g. sudo apt-get install -y redis-server redis-tools)" >&2
  fi
}
