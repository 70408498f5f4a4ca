"""report.md's tables as reStructuredText for the HTML report: each table a captioned list-table."""

from docutils.core import publish_parts

from closedloop.report_rst import md_to_rst

MD = """# Report: `smoke`

Held-out accuracy (%) with 95% bootstrap intervals; n per task: 12 / 12

| model | synthetic | arc_challenge |
|---|---|---|
| sft | 8.3 [0.0, 25.0] | 25.0 [0.0, 50.0] |

![accuracy](plots/accuracy.png)

## MCTS data (closed loop; iteration k searches with policy_{k-1})

| iteration | α histogram |
|---|---|
| 1 | 0.0-0.1: 3, * |
"""


def test_each_table_becomes_a_captioned_list_table():
    rst = md_to_rst(MD)
    assert ".. list-table:: Held-out accuracy (%) with 95% bootstrap intervals; n per task: 12 / 12" in rst
    assert ".. list-table:: MCTS data (closed loop; iteration k searches with policy\\_{k-1})" in rst
    assert "plots/accuracy.png" not in rst  # the plots are the report's own entries
    assert rst.count("n per task: 12 / 12") == 1  # the paragraph above a table is its caption, not repeated
    page = publish_parts(rst, writer="html", settings_overrides={"report_level": 2, "halt_level": 2})["html_body"]
    assert "<caption>Held-out accuracy (%) with 95% bootstrap intervals; n per task: 12 / 12</caption>" in page
    assert "<caption>MCTS data (closed loop; iteration k searches with policy_{k-1})</caption>" in page
    assert "<td>25.0 [0.0, 50.0]</td>" in page and "<td>0.0-0.1: 3, *</td>" in page
    assert "<th class=\"head\">arc_challenge</th>" in page
