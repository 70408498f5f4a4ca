"""The deliverable: ``snakemake --report report.html`` of the smoke run (and of the V-DPO smoke
run), opened in a real headless browser (Debian's ``chromium``): every table of report.md is in
the rendered page with its caption, the landing page says what the experiment was, and a
screenshot is kept under results/ (a CI artifact)."""

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "results" / "report-screenshots"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = ("chromium is not installed: scripts/test.sh installs Debian's chromium as root with apt-get when "
                  "CI=true or CLOSEDLOOP_CHROMIUM=1")
        if os.environ.get("CLOSEDLOOP_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def browse(report: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on the report (as root it needs --no-sandbox); waits for the page's scripts."""
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=15000", *args, report.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)


def rendered_text(report: Path) -> str:
    """The page's text after Chromium ran its scripts: tags dropped, entities decoded, spaces collapsed."""
    dom = browse(report, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.sub(r"<script.*?</script>", " ", dom.stdout, flags=re.S)  # the page's data, not what it shows
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def table_cells(markdown: str) -> list[str]:
    cells = []
    for line in markdown.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-:| ]+\|", line.strip()):
            cells += [c.strip() for c in line.strip().strip("|").split("|") if c.strip()]
    return cells


def make_report(repo: Path, configfile: str, out: str, *targets: str) -> Path:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    made = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", configfile,
                           "--report", out, *targets], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    return repo / out


def screenshot(report: Path, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / name
    taken = browse(report, f"--screenshot={shot}", "--window-size=1200,5200")
    assert taken.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG", taken.stderr[-2000:]
    return shot


def test_smoke_report_html_shows_every_table_in_a_real_browser(smoke_local_run):
    chromium()  # skip before building anything when there is no browser
    repo, run = smoke_local_run
    assert run.returncode == 0, run.stderr[-3000:]
    report = make_report(repo, "configs/smoke.yaml", "results/smoke/report.html")
    text = rendered_text(report)
    markdown = (repo / "results" / "smoke" / "report.md").read_text()
    missing = [cell for cell in table_cells(markdown) if cell not in text]
    assert not missing, missing[:20]
    for caption in ("Held-out accuracy (%) with 95% bootstrap intervals; n per task: 12 / 12",
                    "Accuracy per iteration (policy_k → MCTS → cDPO → policy_k+1)",
                    "Questions gained / lost against the SFT model on the same heldout questions",
                    "MCTS data (closed loop; iteration k searches with policy_{k-1})",
                    "Last logged values of each training run",
                    "Settings that differ from the embedded defaults (configs/default.yaml)"):
        assert caption in text, caption
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout[:12]
    assert f"Code: git commit {commit}" in text and "Seeds: 0." in text
    assert 'model.kind "embedded" "tiny" dpo, evaluate, mcts, mcts_merge, sft' in text  # the config's difference
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text  # the base model's identity (the tiny model's tokenizer)
    screenshot(report, "smoke-report.png")


def test_vdpo_report_html_shows_the_branchs_tables(smoke_local_run):
    chromium()
    repo, _ = smoke_local_run
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "configs/vlm_smoke.yaml",
                          "--", "vdpo_all"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = make_report(repo, "configs/vlm_smoke.yaml", "results/vlm_smoke/report.html", "vdpo_all")
    text = rendered_text(report)
    markdown = (repo / "results" / "vlm_smoke" / "vlm" / "report.md").read_text()
    missing = [cell for cell in table_cells(markdown) if cell not in text]
    assert not missing, missing[:20]
    assert "F1 per negative type" in text and "V-DPO γ, chosen on the validation questions" in text
    screenshot(report, "vdpo-report.png")
