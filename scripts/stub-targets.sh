#!/bin/sh
# Writes a stub source file for every target the workspace's manifests name, so that cargo
# accepts a tree that holds only the manifests (the Dockerfile's dependency layer: building the
# dependencies before the sources are copied keeps a code change from rebuilding Pingora).
#
#   scripts/stub-targets.sh [DIR]     # DIR: the tree holding Cargo.toml files (default: .)
#
# The list comes from the manifests themselves, never from a hand-kept list: adding a
# `[[bench]]` to Cargo.toml cannot break the image again (issue 14). What it reads:
#   [lib], [[bin]], [[bench]], [[example]], [[test]] with their `name` and `path`; a target
#   without `path` gets cargo's default (src/lib.rs, src/main.rs for the bin named like the
#   package, src/bin/NAME.rs, benches/NAME.rs, examples/NAME.rs, tests/NAME.rs);
#   a package that declares neither a lib nor a bin gets src/lib.rs (cargo's auto-discovered lib).
# Existing files are left alone. Plain POSIX sh and awk: the build image has no Python.
# tests/dockerfile.rs checks the result against `cargo metadata` of the real tree.
set -eu
dir=${1:-.}

find "$dir" -name Cargo.toml -not -path '*/target/*' | sort | while read -r manifest; do
  crate=$(dirname "$manifest")
  awk '
    function flush() {
      if (kind == "") return
      p = path
      if (p == "") {
        if (kind == "lib") p = "src/lib.rs"
        else if (kind == "bin") p = (name == pkg ? "src/main.rs" : "src/bin/" name ".rs")
        else if (kind == "bench") p = "benches/" name ".rs"
        else if (kind == "example") p = "examples/" name ".rs"
        else if (kind == "test") p = "tests/" name ".rs"
      }
      if (kind == "lib" || kind == "bin") has_main_target = 1
      # A bin named like the package may be declared before [package] is read: resolve later.
      if (kind == "bin" && path == "") pending[n_pending++] = name
      else print kind, p
      kind = ""; name = ""; path = ""
    }
    # Strips a TOML `key = "value"` line down to value.
    function value(line) {
      sub(/^[^=]*=[ \t]*"/, "", line); sub(/".*$/, "", line); return line
    }
    /^[ \t]*\[/ {
      flush()
      section = $0
      gsub(/[ \t]/, "", section)
      if (section == "[lib]") kind = "lib"
      else if (section == "[[bin]]") kind = "bin"
      else if (section == "[[bench]]") kind = "bench"
      else if (section == "[[example]]") kind = "example"
      else if (section == "[[test]]") kind = "test"
      in_package = (section == "[package]")
      if (in_package) is_package = 1
      next
    }
    /^[ \t]*name[ \t]*=/ { if (kind != "") name = value($0); else if (in_package) pkg = value($0); next }
    /^[ \t]*path[ \t]*=/ { if (kind != "") path = value($0); next }
    END {
      flush()
      for (i = 0; i < n_pending; i++)
        print "bin", (pending[i] == pkg ? "src/main.rs" : "src/bin/" pending[i] ".rs")
      if (is_package && !has_main_target) print "lib", "src/lib.rs"
    }
  ' "$manifest" | while read -r kind path; do
    file="$crate/$path"
    [ -e "$file" ] && continue
    mkdir -p "$(dirname "$file")"
    if [ "$kind" = lib ]; then : >"$file"; else echo 'fn main() {}' >"$file"; fi
  done
done
