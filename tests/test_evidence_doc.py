"""docs/evidence.md quotes the generated study reports: every mean ± std and every interval it quotes must
still be in docs/baselines/baselines.md or docs/order/order.md (regenerating them updates the quotes or fails)."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_number_quoted_in_the_evidence_page_is_in_a_generated_report():
    page = (DOCS / "evidence.md").read_text()
    reports = (DOCS / "baselines" / "baselines.md").read_text() + (DOCS / "order" / "order.md").read_text()
    quoted = re.findall(r"\d+\.\d+ ± \d+\.\d+|\[[-+]\d+\.\d+, [-+]\d+\.\d+\]", page)
    assert len(quoted) > 40  # the page quotes the reports throughout
    missing = [q for q in quoted if q not in reports]
    assert not missing, f"docs/evidence.md quotes numbers the reports no longer hold: {missing}"
