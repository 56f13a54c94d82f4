"""Every implementation's plan agrees with ours on every case (runs before any timing)."""

from .agreement import agreement_limit, ensure_agreement
from .cases import get_case


def test_plans_agree(case_name, bench):
    diffs = ensure_agreement(get_case(case_name, bench["device"]))
    limit = agreement_limit(case_name)
    assert all(d <= limit for d in diffs.values()), diffs
