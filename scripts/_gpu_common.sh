# Sourced by the GPU check scripts (gpu_check.sh, gpu_generative_check.sh) after their header
# comment, with HELP_LINES set to the header's line range ('2,32p'): the shared prelude.
# Sets PY (the interpreter), DRY (1 for --dry-run), BUDGET / END and left() (seconds left of
# VLC_CHECK_BUDGET_S, default DEFAULT_BUDGET), LOGS ($OUT or a temp dir), exports VLC_COMMIT;
# a usage error exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n "$HELP_LINES" "$0"; exit 0 ;;
    *) echo "$(basename "$0"): unknown option $a (allowed: --dry-run)" >&2; exit 2 ;;
  esac
done
BUDGET=${VLC_CHECK_BUDGET_S:-$DEFAULT_BUDGET}
END=$((SECONDS + BUDGET))
left() { echo $((END - SECONDS)); }
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOGS=$OUT; else LOGS=$(mktemp -d); fi
export VLC_COMMIT=${VLC_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
