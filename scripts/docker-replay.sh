#!/usr/bin/env bash
# Replays the Dockerfile's build stage without a container engine, so that CI fails when a
# manifest change would break `docker build` (issue 14: the image broke silently when benches
# were added).
#
#   scripts/docker-replay.sh            # from anywhere; uses $CARGO_TARGET_DIR or ./target
#
# What it does, instruction by instruction of the stage `AS build`:
#   WORKDIR  a folder of the same name inside a fresh temp dir;
#   ENV      exported;
#   COPY     the same sources from the repository (the build context) to the same destination,
#            and nothing else: a file the build needs but the COPY set misses fails here too;
#   RUN      the same shell command, with two stand-ins on PATH: `apt-get` does nothing (the
#            toolchain here already has cmake), and `cargo build ARGS` runs as `cargo check ARGS`
#            without `--release` (cargo parses the same manifests, resolves the same --locked
#            lock file and type-checks the same targets, at a fraction of a release build's time;
#            the dependencies' check artifacts are shared with the rest of CI's target dir).
# Then the runtime stage: every COPY from the context names an existing file, and its
# `COPY --from=build` takes the binary from where the build stage's cargo puts it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dockerfile=${DOCKERFILE:-$repo/Dockerfile}   # DOCKERFILE: replay another one (tests)
real_cargo=$(command -v cargo)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/shim" "$tmp/root"

cat >"$tmp/shim/apt-get" <<'EOF'
#!/bin/sh
echo "  (replay: skipped apt-get $*)" >&2
EOF
cat >"$tmp/shim/cargo" <<EOF
#!/bin/sh
if [ "\${1:-}" = build ]; then
  shift
  args=""
  for a in "\$@"; do [ "\$a" = --release ] || args="\$args \$a"; done
  echo "  (replay: cargo check\$args)" >&2
  exec "$real_cargo" check \$args
fi
exec "$real_cargo" "\$@"
EOF
chmod +x "$tmp/shim/apt-get" "$tmp/shim/cargo"

# The Dockerfile's instructions, one a line: comments dropped, `\` continuations joined.
instructions() {
  sed -e '/^[[:space:]]*#/d' "$dockerfile" | awk '
    { line = line $0 }
    /\\$/ { sub(/\\$/, "", line); next }
    { if (line ~ /[^[:space:]]/) print line; line = "" }'
}

stage=""
workdir="/"
binary_from_build=""
while IFS= read -r ins; do
  op=${ins%%[[:space:]]*}
  rest=${ins#"$op"}
  rest=${rest#"${rest%%[![:space:]]*}"}
  op=${op^^}
  if [ "$op" = FROM ]; then
    if [[ $rest =~ [[:space:]][Aa][Ss][[:space:]]+([^[:space:]]+) ]]; then
      stage=${BASH_REMATCH[1]}
    else
      stage=runtime
    fi
    echo "replay: FROM $rest" >&2
    continue
  fi
  if [ "$stage" = build ]; then
    echo "replay: $op $rest" >&2
    case $op in
      WORKDIR)
        case $rest in /*) workdir=$rest ;; *) workdir="$workdir/$rest" ;; esac
        mkdir -p "$tmp/root$workdir" ;;
      ENV)
        # KEY=VALUE pairs (the form this Dockerfile uses).
        for kv in $rest; do export "${kv?}"; done ;;
      COPY)
        case $rest in --*) echo "replay: COPY flags are not replayed: $rest" >&2; exit 1 ;; esac
        read -r -a parts <<<"$rest"
        dest=${parts[-1]}
        case $dest in /*) ;; *) dest="$workdir/$dest" ;; esac
        unset 'parts[-1]'
        for src in "${parts[@]}"; do
          [ -e "$repo/$src" ] || { echo "replay: COPY $src: not in the build context" >&2; exit 1; }
          if [ -d "$repo/$src" ]; then
            mkdir -p "$tmp/root$dest"
            cp -a "$repo/$src/." "$tmp/root$dest/"
          elif [[ $dest == */ ]] || [ "${#parts[@]}" -gt 1 ]; then
            mkdir -p "$tmp/root$dest"
            cp -a "$repo/$src" "$tmp/root$dest/"
          else
            mkdir -p "$(dirname "$tmp/root$dest")"
            cp -a "$repo/$src" "$tmp/root$dest"
          fi
        done ;;
      RUN)
        (cd "$tmp/root$workdir" && PATH="$tmp/shim:$PATH" bash -euo pipefail -c "$rest") ;;
      *) echo "replay: $op is not replayed" >&2; exit 1 ;;
    esac
  elif [ "$stage" = runtime ] && [ "$op" = COPY ]; then
    if [[ $rest == --from=build* ]]; then
      read -r -a parts <<<"${rest#--from=build}"
      binary_from_build=${parts[0]}
    else
      read -r -a parts <<<"$rest"
      unset 'parts[-1]'
      for src in "${parts[@]}"; do
        [ -e "$repo/$src" ] || { echo "replay: runtime COPY $src: not in the repository" >&2; exit 1; }
      done
    fi
  fi
done < <(instructions)

# The build stage's cargo writes target/release/podgate below its WORKDIR.
expected="$workdir/target/release/podgate"
if [ "$binary_from_build" != "$expected" ]; then
  echo "replay: the runtime stage copies '$binary_from_build' from the build stage, but cargo" \
       "builds $expected" >&2
  exit 1
fi
echo "replay: the Dockerfile's build stage passed" >&2
