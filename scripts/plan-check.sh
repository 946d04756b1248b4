#!/usr/bin/env bash
# Lists the cases of the test plan that should be Rust tests but have no `fn NAME(` yet. A case
# marked "test with a real VM" counts only when its test is in the real-guest module
# (tests/realvm.rs): a synthetic test of the same name elsewhere does not stand in for it.
# Reports a count; it does not fail the build (the plan is being worked through issue by issue).
# The map is docs/plan-cases.tsv (docs/test-plan.md is the table a reader uses); a relative path
# is taken from the top of the repository.
set -euo pipefail
tsv=${1:-docs/plan-cases.tsv}
cd "$(dirname "$0")/.."
if [[ ! -r $tsv ]]; then
    echo "plan-check: $tsv not found; nothing to check" >&2
    exit 0
fi
total=0
missing=()
while IFS=$'\t' read -r _seed name where; do
    [[ $where == test* ]] || continue
    total=$((total + 1))
    if [[ $where == *"real VM"* ]]; then
        grep -B1 -E "^fn ${name}\(" tests/realvm.rs | grep -q "^#\[test\]" || missing+=("$name ($where: not in tests/realvm.rs)")
    elif ! grep -rqE "fn ${name}\(" --include='*.rs' engine hv control mesh tools perf tests; then
        missing+=("$name ($where)")
    fi
done < <(grep -v '^#' "$tsv")
for m in "${missing[@]}"; do echo "no test: $m"; done
echo "plan-check: $((total - ${#missing[@]})) of $total planned test cases have a Rust test; ${#missing[@]} missing"
