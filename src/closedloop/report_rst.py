"""report.md as reStructuredText for ``snakemake --report`` (stages ``report`` and ``vlm_report``):
:func:`md_to_rst` turns every table into a captioned ``list-table``, and :func:`overview_rst`
says what the experiment was (git commit, seeds, base model, every setting that differs from
the embedded defaults, read from the provenance records of the report's inputs and everything
they derive from). The HTML report's landing page (``workflow/report/workflow.rst``) includes
each ``report.rst`` that a rule marks with ``report(...)``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from closedloop import artifacts, paths

_TABLE_ROW = re.compile(r"^\|(.*)\|\s*$")
_RULE = re.compile(r"^\|[-:| ]+\|\s*$")


def _inline(text: str) -> str:
    """Markdown inline text as RST: `code` -> ``code``, markup characters escaped elsewhere."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"``{part[1:-1]}``" if part[1:-1] else "")
        else:
            part = re.sub(r"([\\*_|<>])", r"\\\1", part).replace(r"\*\*", "**")
            out.append(part)
    return "".join(out)


def _list_table(rows: list[list[str]], caption: str) -> str:
    lines = [f".. list-table:: {_inline(caption)}", "   :header-rows: 1", "   :class: closedloop-table", ""]
    for row in rows:
        for i, cell in enumerate(row):
            lines.append(("   * - " if i == 0 else "     - ") + (_inline(cell.strip()) or ".."))
    return "\n".join(lines)


def md_to_rst(md: str) -> str:
    """The subset of Markdown our reports use (headings, paragraphs, lists, tables; image lines
    dropped: the plots are their own report entries) as RST; each table becomes a ``list-table``
    whose caption is the paragraph just above it, else its section's heading."""
    out: list[str] = []
    heading, paragraph, table = "", [], []
    in_paragraph, paragraph_at = False, 0

    def flush_table():
        if table:
            caption = " ".join(paragraph) or heading
            if paragraph:  # the paragraph becomes the caption: not written twice
                del out[paragraph_at:paragraph_at + len(paragraph)]
            out.extend([_list_table(table, caption.strip().rstrip(":") or "table"), ""])
            table.clear()
            paragraph.clear()

    for line in md.splitlines():
        if _RULE.match(line):
            continue
        row = _TABLE_ROW.match(line)
        if row:
            table.append(row.group(1).split("|"))
            continue
        flush_table()
        level = len(line) - len(line.lstrip("#"))
        if line.startswith("!["):
            continue
        if level and line[level:level + 1] == " ":
            heading = line[level + 1:].strip()
            text = _inline(heading)
            out += [text, "=-~"[min(level, 3) - 1] * max(len(text), 3), ""]
            paragraph.clear()
            in_paragraph = False
        elif line.strip():
            if not in_paragraph:
                paragraph.clear()
                paragraph_at = len(out)
            out.append(_inline(line))
            paragraph.append(line.strip())
            in_paragraph = True
        else:
            out.append("")
            in_paragraph = False
    flush_table()
    return "\n".join(out).rstrip() + "\n"


def run_overview(starts: list[Path], root: Path = Path(".")) -> dict:
    """What the report's inputs came from, read from their provenance records and those of
    everything they derive from (:func:`closedloop.lineage.graph`): git commits, seeds, the base
    model, and each setting that differs from the embedded defaults with the stages it reached."""
    from closedloop import lineage

    nodes: dict = {}
    for start in starts:
        if artifacts.producer_of(Path(start)) is not None:
            nodes.update(lineage.graph(Path(start), root)[1])
    commits, seeds, diff, base = {}, set(), {}, None
    for node in nodes.values():
        code = node.record.get("code") or {}
        commits.setdefault(code.get("git_commit") or "unknown", set()).add(bool(code.get("dirty")))
        if node.record.get("seed") is not None:
            seeds.add(node.record["seed"])
        base = base or node.record.get("base_model")
        for key, (default, value) in lineage.config_diff(node).items():
            entry = diff.setdefault(key, {"default": default, "values": {}})
            entry["values"].setdefault(json.dumps(value), set()).add(node.stage)
    return {"artifacts": len(nodes), "commits": commits, "seeds": sorted(seeds), "base_model": base, "diff": diff}


def overview_rst(cfg, overview: dict, title: str) -> str:
    """The landing page's section: what the experiment was (commit, seeds, base model, config
    difference from the defaults), as RST."""
    commits = ", ".join(f"``{c[:12]}``" + (" (with uncommitted changes)" if True in dirty else "")
                        for c, dirty in overview["commits"].items()) or "unknown"
    base = overview["base_model"] or {}
    lines = [title, "=" * max(len(title), 3), "",
             f"Experiment ``{cfg.experiment}``, results in ``{paths.run_dir(cfg)}``; "
             f"{overview['artifacts']} artifacts with provenance records. Code: git commit {commits}. "
             f"Seeds: {', '.join(map(str, overview['seeds'])) or 'none recorded'}.", ""]
    if base:
        lines += [_list_table([["base model", "value"]] + [[k, str(v)] for k, v in base.items() if v is not None],
                              "Base model (from the provenance records)"), ""]
    rows = [["setting", "default", "this run", "stages"]]
    for key, entry in sorted(overview["diff"].items()):
        for value, stages in entry["values"].items():
            rows.append([key, json.dumps(entry["default"]), value, ", ".join(sorted(stages))])
    if len(rows) > 1:
        lines += [_list_table(rows, "Settings that differ from the embedded defaults (configs/default.yaml)"), ""]
    else:
        lines += ["Every setting is the embedded default (configs/default.yaml).", ""]
    lines += ["Plots: the *Evaluation* and *Training* categories of this report. Tables: below.", ""]
    return "\n".join(lines)
