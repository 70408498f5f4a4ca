"""The layout's rules, checked: one stage table that the rules, the CLI and the launcher agree
on; stage modules imported by nothing but the table; family packages that never import a stage
or another family; a DAG that parses without torch; and what a new stage touches."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from closedloop import launch, stage_table
from closedloop.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "closedloop"
FAMILIES = ("loop", "vlm", "vlcot", "coral")


def _rules() -> dict[str, str]:
    """rule name -> its text, for every rule in rules/*.smk."""
    rules = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^rule (\w+):", text, re.M)]
        ends = [start for start, _ in starts[1:]] + [len(text)]
        for (start, name), end in zip(starts, ends[:len(starts)], strict=True):
            rules[name] = text[start:end]
    return rules


def test_every_run_stage_call_is_a_table_row_and_every_row_has_its_rule():
    rules = _rules()
    called = {name: re.findall(r"closedloop run-stage (\w+)", body) for name, body in rules.items()}
    for rule, stages in called.items():
        for stage in stages:
            assert stage in stage_table.STAGES, f"rule {rule} runs unknown stage {stage}"
            assert stage == rule, f"rule {rule} runs stage {stage}: rule name = stage name"
    assert set(stage_table.STAGES) == {s for stages in called.values() for s in stages}
    for name in stage_table.STAGES:  # stage name = module name, and the module has main(cfg)
        tree = ast.parse((SRC / "stages" / f"{name}.py").read_text())
        assert "main" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name
    assert {p.stem for p in (SRC / "stages").glob("*.py")} - {"__init__"} == set(stage_table.STAGES)


def test_cli_and_launcher_read_the_table():
    choices = next(a for a in _parser()._subparsers._group_actions[0].choices["run-stage"]._actions
                   if a.dest == "stage").choices
    assert list(choices) == list(stage_table.STAGES)
    assert set(launch.HEAVY) == {s.name for s in stage_table.STAGES.values() if s.launch != stage_table.LOCAL}
    assert set(launch.TRAINING) == set(stage_table.names(stage_table.TRAINING))
    for name in stage_table.STAGES:
        assert callable(launch.stage_function(name))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("closedloop")}


def test_only_the_table_names_stage_modules_and_families_stay_apart():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        imports = _imports(path)
        stage_imports = {m for m in imports if m.startswith("closedloop.stages")}
        assert not stage_imports, f"{rel} imports a stage module: {sorted(stage_imports)}"
        family = rel.parts[0] if rel.parts[0] in FAMILIES else None
        for other in FAMILIES:
            if other == family:
                continue
            if family is not None or rel.parts[0] not in ("stages",):
                crossing = {m for m in imports if m.startswith(f"closedloop.{other}")}
                if family is None:  # shared code never reaches into a family package
                    assert not crossing, f"shared module {rel} imports family code {sorted(crossing)}"
                else:
                    assert not crossing, f"family {family} ({rel}) imports family {other}: {sorted(crossing)}"


def test_parsing_the_dag_imports_neither_torch_nor_transformers(tmp_path):
    """What the Snakefile imports (config, paths, launch, the table) is torch-free."""
    code = ("import sys; import closedloop.cli, closedloop.config, closedloop.paths, closedloop.launch, "
            "closedloop.stage_table, closedloop.lineage; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    smk_imports = set()
    for smk in [ROOT / "Snakefile", *(ROOT / "rules").glob("*.smk")]:
        smk_imports |= set(re.findall(r"^\s*(?:from|import) (closedloop[\w.]*)", smk.read_text(), re.M))
    assert smk_imports <= {"closedloop"}, smk_imports


def test_no_source_file_over_400_lines_without_a_reason():
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 400:
            assert any("Longer than 400 lines" in line for line in lines[:30]), f"{path} has {len(lines)} lines"


@pytest.mark.slow
def test_a_new_stage_touches_six_files(repo_copy):
    """Add a dummy stage to an existing family in a copy of the repo: its module, one table row,
    its config dataclass, paths.py, one rules file and configs/default.yaml; the DAG plans it
    and `closedloop run-stage` runs it."""
    src = repo_copy / "src" / "closedloop"
    (src / "stages" / "loop_probe.py").write_text(
        '"""Stage ``loop_probe``: a dummy stage of the loop family (test)."""\n\n'
        "from closedloop import artifacts, paths\nfrom closedloop import config as cl_config\n\n\n"
        "def main(cfg) -> None:\n"
        "    view = cl_config.stage_view(cfg, 'loop_probe')\n"
        "    with artifacts.artifact_dir(paths.loop_probe_dir(cfg), 'loop_probe', view, {}, cfg.seed) as out:\n"
        "        (out / 'probe.txt').write_text(str(cfg.probe.value))\n")
    table = (src / "stage_table.py").read_text()
    (src / "stage_table.py").write_text(table.replace(
        '    Stage("report", ', '    Stage("loop_probe", "loop", ("probe",)),\n    Stage("report", '))
    llm = (src / "config" / "llm.py").read_text()
    llm = llm.replace("@dataclass\nclass LLMSections:", "@dataclass\nclass ProbeConfig:\n    value: int = 7\n\n\n"
                      "@dataclass\nclass LLMSections:")
    (src / "config" / "llm.py").write_text(llm + "    probe: ProbeConfig = field(default_factory=ProbeConfig)\n")
    (src / "paths.py").write_text((src / "paths.py").read_text()
                                  + "\n\ndef loop_probe_dir(cfg) -> Path:\n    return run_dir(cfg) / 'probe'\n")
    (repo_copy / "rules" / "mcts.smk").write_text((repo_copy / "rules" / "mcts.smk").read_text() + '''

rule loop_probe:
    output:
        directory(str(paths.loop_probe_dir(CFG))),
    params:
        cfg=view_json("loop_probe"),
    log:
        str(LOGS / "loop_probe.log"),
    shell:
        "closedloop run-stage loop_probe --config-yaml {params.cfg:q} 2>&1 | tee {log}"
''')
    default = repo_copy / "configs" / "default.yaml"
    default.write_text(default.read_text() + "probe:\n  value: 7\n")
    touched = subprocess.run(["git", "status", "--porcelain"], cwd=repo_copy, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert sorted(line[3:] for line in touched) == sorted([
        "configs/default.yaml", "rules/mcts.smk", "src/closedloop/config/llm.py", "src/closedloop/paths.py", "src/closedloop/stage_table.py", "src/closedloop/stages/loop_probe.py"])
    env = {**os.environ, "PYTHONPATH": str(repo_copy / "src"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", "configs/smoke.yaml",
                          "--config", "probe={value: 3}", "--", "loop_probe"], cwd=repo_copy, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (repo_copy / "results" / "smoke" / "probe" / "probe.txt").read_text() == "3"
