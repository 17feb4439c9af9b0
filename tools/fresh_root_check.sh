#!/usr/bin/env bash
# Proves that tools/setup.sh installs everything the build needs on a fresh Debian 12:
# builds a pristine minimal Debian 12 (bookworm) root with debootstrap, copies the
# COMMITTED tree into it (git archive; uncommitted edits are not part of the check),
# and inside it, as root, exactly as a user would: runs `bash tools/setup.sh`,
# configures (every find_package of the full build: services, tests, benchmarks;
# CUDA off), builds the `dmoe` CLI, writes a tiny model and generates tokens with it.
# Any failure exits non-zero naming the step.
#
#   sudo bash tools/fresh_root_check.sh                    # the committed HEAD
#   sudo bash tools/fresh_root_check.sh --tree-ish REV     # another commit/tag/branch
#
# Needs root (debootstrap, chroot, mounts) and the network to a Debian mirror.
# Cached between runs, outside the repository, under $DMOE_FRESH_ROOT_CACHE
# (default /var/cache/dmoe-fresh-root): the debootstrapped root as a tarball (every
# run extracts it into a new temporary directory, so every run starts pristine),
# apt's downloaded .deb files and a ccache directory (both bind-mounted into the
# root). Everything mounted is unmounted and the temporary root removed on exit,
# also on failure or Ctrl-C.
set -euo pipefail

SUITE=bookworm
CACHE=${DMOE_FRESH_ROOT_CACHE:-/var/cache/dmoe-fresh-root}
TREEISH=HEAD
MIRROR=""
REFRESH_BASE=0
KEEP_ROOT=0
MAX_AGE_DAYS=${DMOE_FRESH_ROOT_MAX_AGE_DAYS:-30}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  cat <<EOF
Options:
  --tree-ish REV   check the tree of REV instead of HEAD (e.g. a parent commit)
  --cache-dir DIR  cache directory (default: $CACHE)
  --mirror URL     Debian mirror for debootstrap (default: the host's apt sources)
  --refresh-base   rebuild the cached base root (also done when it is older than
                   $MAX_AGE_DAYS days: DMOE_FRESH_ROOT_MAX_AGE_DAYS)
  --keep-root      keep the temporary root (unmounted) for inspection
EOF
}

while (($#)); do
  case "$1" in
    --tree-ish) TREEISH=${2:?--tree-ish needs a value}; shift 2 ;;
    --tree-ish=*) TREEISH=${1#*=}; shift ;;
    --cache-dir) CACHE=${2:?--cache-dir needs a value}; shift 2 ;;
    --cache-dir=*) CACHE=${1#*=}; shift ;;
    --mirror) MIRROR=${2:?--mirror needs a value}; shift 2 ;;
    --mirror=*) MIRROR=${1#*=}; shift ;;
    --refresh-base) REFRESH_BASE=1; shift ;;
    --keep-root) KEEP_ROOT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "fresh_root_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "fresh_root_check: $*"; }
die() { echo "fresh_root_check: ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot and bind mounts): run it as root or with sudo"
for t in git chroot mount flock awk tar; do
  command -v "$t" >/dev/null || die "'$t' is not installed on this machine"
done
# safe.directory: root reads a checkout that another user may own.
repo_git() { git -c safe.directory="$REPO" -C "$REPO" "$@"; }
COMMIT=$(repo_git rev-parse --verify --quiet "$TREEISH^{commit}") ||
  die "--tree-ish '$TREEISH' is not a commit in $REPO"
TREE="$TREEISH"
[[ $TREEISH == "$COMMIT" ]] || TREE+=" ($COMMIT)"
CACHE=$(mkdir -p "$CACHE" && cd "$CACHE" && pwd)
case "$CACHE/" in
  "$REPO"/*) die "the cache directory $CACHE must be outside the repository" ;;
esac

# ---- timing and step runner -------------------------------------------------------
T_START=$(date +%s)
STEP_NAMES=()
STEP_TIMES=()
LOGS="$CACHE/logs"     # one log per step of the latest run
now() { date +%s; }
fmt() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# run_step NAME CMD...: runs CMD (a function or command) with its output in
# $LOGS/NAME.log; on failure prints the log's tail and exits 1 naming the step. CMD
# runs as a background job so that `set -e` holds inside it (it would not inside a
# function called from `cmd || ...`) and so that cleanup can stop it.
STEP_PID=""
CUR_STEP=""
run_step() {
  local name=$1; shift
  CUR_STEP=$name
  local t0 rc=0
  t0=$(now)
  printf 'fresh_root_check: %-12s ... ' "$name"
  "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  STEP_PID=$!
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  local dt=$(($(now) - t0))
  STEP_NAMES+=("$name")
  STEP_TIMES+=("$dt")
  if ((rc != 0)); then
    echo "FAILED after $(fmt "$dt") (exit $rc)"
    echo "---- last 40 lines of $LOGS/$name.log"
    tail -n 40 "$LOGS/$name.log"
    echo "----"
    local hint=""
    case $name in
      setup|setup-again|configure|build) hint=" (a package missing from tools/setup.sh?)" ;;
    esac
    die "step '$name' failed for the tree of $TREE$hint: see $LOGS/$name.log"
  fi
  echo "ok ($(fmt "$dt"))"
}

# ---- cleanup: stop what runs, unmount everything, remove the temporary roots -------
ROOT=""       # the root of this run
BASE_TMP=""   # debootstrap's work directory while the base root is being built
mounts_under() {  # mount points at or below $1, deepest first
  awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts |
    awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}
kill_tree() {  # kills process $1 and its descendants (children first)
  local pid=$1 c
  for c in $(awk -v pp="$pid" '{ sub(/^.*\) /, ""); if ($2 == pp) print FILENAME }' \
               /proc/[0-9]*/stat 2>/dev/null | cut -d/ -f3); do
    kill_tree "$c"
  done
  kill -9 "$pid" 2>/dev/null || true
}
release_dir() {  # unmounts everything under $1, then removes it unless told to keep it
  local dir=$1 keep=$2 p r m
  [[ -n $dir && -d $dir ]] || return 0
  # Processes still running inside it (started by this script through chroot).
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    if [[ $r == "$dir" || $r == "$dir"/* ]]; then kill -9 "${p#/proc/}" 2>/dev/null || true; fi
  done
  while read -r m; do
    [[ -n $m ]] || continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null ||
      echo "fresh_root_check: WARNING: cannot unmount $m" >&2
  done < <(mounts_under "$dir")
  if [[ -n $(mounts_under "$dir") ]]; then
    # Never delete through a bind mount: that would delete the host's /dev or the caches.
    echo "fresh_root_check: ERROR: still mounted under $dir, not removing it:" >&2
    mounts_under "$dir" >&2
    return 1
  fi
  if ((keep)); then
    echo "fresh_root_check: root kept (unmounted) at $dir"
  else
    rm -rf "$dir"
  fi
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n $STEP_PID ]]; then
    echo
    echo "fresh_root_check: interrupted during step '$CUR_STEP' (exit $rc); cleaning up" >&2
    kill_tree "$STEP_PID"
  fi
  release_dir "$ROOT" "$KEEP_ROOT" || rc=1
  release_dir "$BASE_TMP" 0 || rc=1
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One run at a time per cache (apt's archive cache and ccache are shared).
exec 9>"$CACHE/lock"
if ! flock -n 9; then
  say "waiting for another run holding $CACHE/lock"
  flock 9
fi
rm -rf "$LOGS" && mkdir -p "$LOGS" "$CACHE/apt-archives/partial" "$CACHE/ccache"

say "checking the COMMITTED tree of $TREE via git archive;" \
  "uncommitted changes are not included"
if [[ $TREEISH == HEAD ]] && ! repo_git diff --quiet HEAD -- 2>/dev/null; then
  say "note: the work tree has uncommitted changes; they are NOT part of this check"
fi

# ---- host tools -----------------------------------------------------------------
host_tools() {
  local need=()
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || need+=(debian-archive-keyring)
  if ((${#need[@]})); then
    echo "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
  debootstrap --version
}
run_step host-tools host_tools

# ---- the mirror: the host's apt sources, else deb.debian.org ------------------------
host_codename() { (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}"); }
# The first URI serving "$SUITE" (the release itself, not -updates/-security) in the
# host's deb822 *.sources or one-line *.list sources.
host_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk -v suite="$SUITE" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && enabled != "no" && uri != "")
          { print uri; found = 1; exit }
        types = ""; suites = ""; uri = ""; enabled = ""
      }
      /^[ \t]*$/ { flush(); next }
      /^#/ { next }
      tolower($1) == "types:" { $1 = ""; types = $0 }
      tolower($1) == "suites:" { $1 = ""; suites = $0 }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "enabled:" { enabled = tolower($2) }
      END { if (!found) flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2 }'
  done
}
if [[ -z $MIRROR ]]; then
  MIRROR=$(host_mirror | grep -E '^https?://' | head -n1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
say "mirror $MIRROR"

# ---- base root: debootstrap once, cached as a tarball -----------------------------
if command -v zstd >/dev/null; then
  TARBALL="$CACHE/$SUITE-minbase.tar.zst"; TAR_COMP=(-I zstd)
else
  TARBALL="$CACHE/$SUITE-minbase.tar.gz"; TAR_COMP=(-z)
fi
make_base() {
  debootstrap --variant=minbase "$SUITE" "$BASE_TMP/root" "$MIRROR"
  # Its downloaded .deb files are not part of a fresh machine.
  rm -f "$BASE_TMP"/root/var/cache/apt/archives/*.deb
  if [[ -n $(mounts_under "$BASE_TMP") ]]; then
    echo "debootstrap left mounts under $BASE_TMP:"; mounts_under "$BASE_TMP"; return 1
  fi
  tar -C "$BASE_TMP/root" --numeric-owner -cpf "$TARBALL.tmp" "${TAR_COMP[@]}" .
  mv -f "$TARBALL.tmp" "$TARBALL"
}
if ((REFRESH_BASE)) || [[ ! -s $TARBALL ]] ||
   [[ -n $(find "$TARBALL" -mtime +"$MAX_AGE_DAYS" 2>/dev/null) ]]; then
  BASE_TMP=$(mktemp -d "$CACHE/debootstrap.XXXXXX")
  run_step debootstrap make_base
  release_dir "$BASE_TMP" 0 && BASE_TMP=""
else
  say "base root: cached $TARBALL ($(date -r "$TARBALL" '+%F %T'))"
fi

ROOT=$(mktemp -d "${TMPDIR:-/var/tmp}/dmoe-fresh-root.XXXXXX")
run_step extract tar -C "$ROOT" --numeric-owner -xpf "$TARBALL" "${TAR_COMP[@]}"

# ---- the committed tree ---------------------------------------------------------
copy_tree() {
  mkdir -p "$ROOT/src"
  repo_git archive "$COMMIT" | tar -x -C "$ROOT/src"
  ls "$ROOT/src/tools/setup.sh"
}
run_step source copy_tree

# ---- mounts, DNS, apt sources ---------------------------------------------------
prepare_root() {
  mount -t proc proc "$ROOT/proc"
  mount --bind /sys "$ROOT/sys"
  mount --rbind /dev "$ROOT/dev"
  mount --make-rslave "$ROOT/dev"
  mkdir -p "$ROOT/var/cache/apt/archives" "$ROOT/var/cache/dmoe-ccache"
  mount --bind "$CACHE/apt-archives" "$ROOT/var/cache/apt/archives"
  mount --bind "$CACHE/ccache" "$ROOT/var/cache/dmoe-ccache"
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # dpkg without an fsync per file, as in Debian's official container images: the
  # root is thrown away, and this changes nothing about what gets installed.
  echo force-unsafe-io >"$ROOT/etc/dpkg/dpkg.cfg.d/fresh-root-unsafe-io"
  # apt reaches the same mirrors as the host: on a Debian 12 host its sources and
  # keys, plus its apt.conf(.d) files that set how apt reaches them (proxies, TLS,
  # snapshot validity); otherwise debootstrap's own "deb $MIRROR $SUITE main" stays.
  if [[ $(host_codename) == "$SUITE" ]]; then
    local f k
    rm -f "$ROOT/etc/apt/sources.list"
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
      [[ -f $f ]] && cp "$f" "$ROOT$f" && echo "apt source: $f"
    done
    [[ -f /etc/apt/trusted.gpg ]] && cp -n /etc/apt/trusted.gpg "$ROOT/etc/apt/"
    for f in /etc/apt/trusted.gpg.d/* /etc/apt/keyrings/*; do
      [[ -f $f ]] && cp -n "$f" "$ROOT$f"
    done
    for k in $(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                   /etc/apt/sources.list.d/*.sources 2>/dev/null |
               grep -oiE 'signed-by(:|=)[[:space:]]*/[^] ,]+' | sed -E 's/^[^/]*//' | sort -u); do
      [[ -f $k && ! -e $ROOT$k ]] && mkdir -p "$(dirname "$ROOT$k")" && cp "$k" "$ROOT$k"
    done
    for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
      [[ -f $f ]] && grep -qE 'Proxy|CaInfo|Verify-Peer|Verify-Host|Check-Valid-Until|Check-Date' "$f" &&
        cp "$f" "$ROOT$f" && echo "apt conf: $f"
    done
  else
    echo "host is not Debian $SUITE: apt in the root uses $MIRROR only"
  fi
  cat "$ROOT/etc/debian_version"
}
run_step mounts prepare_root

# in_root CMD: runs CMD with bash in /src inside the root, with a clean login-like
# environment (what a root shell on a fresh machine has) plus CCACHE_DIR.
in_root() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CCACHE_DIR=/var/cache/dmoe-ccache CCACHE_MAXSIZE=2G \
    bash -euo pipefail -c "cd /src && $1"
}

# ---- inside the root: exactly what a user does --------------------------------------
run_step setup in_root 'bash tools/setup.sh && apt-get autoclean -qq'
# A second run must find everything installed (a package name dpkg never reports as
# installed, e.g. a virtual one, would make every run call apt-get again).
run_step setup-again in_root 'out=$(bash tools/setup.sh 2>&1); echo "$out"; [[ -z $out ]]'
# Configure with every find_package of the full build (services, tests, benchmarks),
# so a package missing from setup.sh fails here even if `dmoe` does not use it.
run_step configure in_root 'cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDMOE_CUDA=OFF'
run_step build in_root 'ccache -z; cmake --build build -j"$(nproc)" --target dmoe; ccache -sv'
run_step make-model in_root 'build/bin/dmoe make-model --preset tiny-v2lite --out /tmp/tiny-v2lite && ls -l /tmp/tiny-v2lite'
check_generate() {
  in_root 'build/bin/dmoe generate --model /tmp/tiny-v2lite --tokens 1,2,3 --max-tokens 8 --ignore-eos --json --quiet' |
    tee "$LOGS/generate.out"
  grep -qE '"tokens":\[([0-9]+,){7}[0-9]+\]' "$LOGS/generate.out" ||
    { echo "expected 8 generated token ids in the output above"; return 1; }
}
run_step generate check_generate
say "generated: $(cat "$LOGS/generate.out")"

# ---- cleanup and summary --------------------------------------------------------------
t0=$(now)
release_dir "$ROOT" "$KEEP_ROOT" || die "cleanup: could not release $ROOT"
ROOT=""
STEP_NAMES+=(cleanup)
STEP_TIMES+=($(($(now) - t0)))
total=$(($(now) - T_START))
summary=""
for i in "${!STEP_NAMES[@]}"; do summary+=" ${STEP_NAMES[$i]} $(fmt "${STEP_TIMES[$i]}"),"; done
say "timings:${summary%,}; total $(fmt "$total")"
say "PASSED: tools/setup.sh on a fresh Debian $SUITE root installs what $TREE needs to configure, build and run dmoe"
