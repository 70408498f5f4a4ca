"""``closedloop lineage``: where an artifact came from, and whether it is still what was recorded.

Longer than 400 lines because the CLI, the walk back through provenance records and the
verify/push/pull commands share one record format and are read together.

    closedloop lineage results/default/iter2/dpo            # the chain back to the data, as a tree
    closedloop lineage results/default/report.md --json     # the same graph as JSON (--mermaid, --dot)
    closedloop lineage verify [PATH]                        # re-hash; name every artifact that changed
    closedloop lineage push | pull [--remote NAME]          # DVC push / pull (+ restore-mtimes)
    closedloop lineage restore-mtimes                       # mtimes in DAG order, for Snakemake

The graph is read from the provenance records (``closedloop.artifacts``): each names its
artifact's content (sha256 per file) and, per input, the producing artifact. Paths in
records are relative to the directory the pipeline ran in (the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from closedloop import artifacts, dvc_store
from closedloop import config as cl_config

SKIP_DIRS = {".git", ".dvc", ".snakemake", ".venv", "node_modules", "__pycache__"}


@dataclass
class Node:
    """One artifact: its key (path as shown), record file and provenance record."""

    key: str
    record_file: Path
    record: dict
    inputs: dict[str, tuple[str | None, dict]] = field(default_factory=dict)  # name -> (producer key, input record)

    @property
    def stage(self) -> str:
        return self.record.get("stage", "?")

    @property
    def sha256(self) -> str | None:
        return (self.record.get("artifact") or {}).get("sha256")


class LineageError(ValueError):
    """A path has no provenance record, or a record is unreadable (the message names the file)."""


def _resolve(path: str | Path, root: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


def _key(path: Path, root: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read(record_file: Path) -> dict:
    try:
        return json.loads(record_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LineageError(f"{record_file}: unreadable provenance record: {err}") from err


def artifact_of_record(record_file: Path) -> Path:
    """The artifact a record describes: its directory, or ``<stem>.md`` style files (the report)."""
    if record_file.name == artifacts.PROVENANCE:
        return record_file.parent
    record = _read(record_file)
    recorded = (record.get("artifact") or {}).get("path")
    stem = record_file.name.removesuffix(f".{artifacts.PROVENANCE}")
    return record_file.parent / (Path(recorded).name if recorded else f"{stem}.md")


def load_node(artifact: Path, root: Path) -> Node:
    """The node of ``artifact`` (a path to it or to anything inside it)."""
    producer = artifacts.producer_of(artifact)
    if producer is None:
        raise LineageError(f"{artifact}: no provenance record here or in a parent directory "
                           f"(expected {artifacts.PROVENANCE} or <name>.{artifacts.PROVENANCE})")
    record_file = artifacts.record_path(producer)
    node = Node(_key(producer, root), record_file, _read(record_file))
    for name, inp in (node.record.get("inputs") or {}).items():
        source = inp.get("artifact")
        if source is None:  # a record written before producers were named: find it now
            found = artifacts.producer_of(_resolve(inp["path"], root))
            source = str(found) if found is not None else None
        node.inputs[name] = (_key(_resolve(source, root), root) if source else None, inp)
    return node


def graph(start: Path, root: Path) -> tuple[str, dict[str, Node]]:
    """Every artifact ``start`` derives from, keyed by path; returns (start key, nodes)."""
    first = load_node(start, root)
    nodes, todo = {first.key: first}, [first]
    while todo:
        node = todo.pop()
        for source, _ in node.inputs.values():
            if source is not None and source not in nodes:
                path = _resolve(source, root)
                if artifacts.record_path(path) is None:
                    continue  # a producer that is gone: shown as missing
                nodes[source] = load_node(path, root)
                todo.append(nodes[source])
    return first.key, nodes


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_DEFAULTS: dict | None = None


def config_diff(node: Node) -> dict[str, list]:
    """``{dotted key: [default, recorded]}`` for every setting of the node's config view that
    differs from the embedded default (``job.*`` and the data/results dirs left out)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        defaults = OmegaConf.structured(cl_config.ExperimentConfig)
        _DEFAULTS = _flatten(OmegaConf.to_container(defaults, enum_to_str=True))
    config_file = node.record_file.with_name(node.record_file.name.replace(artifacts.PROVENANCE, artifacts.CONFIG))
    if not config_file.is_file():
        return {}
    view = _flatten(OmegaConf.to_container(OmegaConf.load(config_file), enum_to_str=True))
    skip = ("job.", "data_dir", "results_dir")
    return {key: [_DEFAULTS.get(key), value] for key, value in sorted(view.items())
            if not key.startswith(skip) and _DEFAULTS.get(key, object()) != value}


def _edge_state(nodes: dict[str, Node], source: str | None, inp: dict) -> str:
    """"" when the input is what its producer recorded; else why not."""
    if source is None:
        return " (no producing artifact)"
    if source not in nodes:
        return " (producer missing)"
    recorded = inp.get("artifact_sha256")
    if recorded and nodes[source].sha256 and recorded != nodes[source].sha256:
        return " (stale: produced again since)"
    return ""


def _diff_text(diff: dict) -> str:
    return ", ".join(f"{k}: {d!r}→{v!r}" for k, (d, v) in diff.items()) or "defaults"


def render_tree(start: str, nodes: dict[str, Node]) -> str:
    """The chain as an indented tree; an artifact already shown is not expanded again."""
    lines, shown = [], set()

    def label(node: Node) -> str:
        sha = (node.sha256 or "unrecorded")[:12]
        return f"{node.key}  [{node.stage}]  sha256:{sha}  Δconfig: {_diff_text(config_diff(node))}"

    def walk(key: str, indent: str) -> None:
        node = nodes[key]
        shown.add(key)
        items = list(node.inputs.items())
        for i, (name, (source, inp)) in enumerate(items):
            last = i == len(items) - 1
            branch, more = ("└─ ", "   ") if last else ("├─ ", "│  ")
            state = _edge_state(nodes, source, inp)
            if source in nodes and source in shown:
                lines.append(f"{indent}{branch}{name}: {source}  [{nodes[source].stage}] (shown above){state}")
            elif source in nodes:
                lines.append(f"{indent}{branch}{name}: {label(nodes[source])}{state}")
                walk(source, indent + more)
            else:
                lines.append(f"{indent}{branch}{name}: {inp.get('path')}{state}")

    lines.append(label(nodes[start]))
    walk(start, "")
    return "\n".join(lines) + "\n"


def to_json(start: str, nodes: dict[str, Node]) -> dict:
    """The lineage graph: artifacts (stage, hash, config difference, code, times) and edges."""
    out = {"artifact": start, "artifacts": {}, "edges": []}
    for key, node in nodes.items():
        r = node.record
        out["artifacts"][key] = {
            "stage": node.stage, "sha256": node.sha256, "record": str(node.record_file),
            "config_hash": r.get("config_hash"), "config_diff": config_diff(node), "code": r.get("code"),
            "seed": r.get("seed"), "started": r.get("started"), "finished": r.get("finished"),
            "host": r.get("host"), "slurm_job_id": r.get("slurm_job_id"),
        }
        for name, (source, inp) in node.inputs.items():
            out["edges"].append({"from": source, "to": key, "input": name, "path": inp.get("path"),
                                 "sha256": inp.get("sha256"), "state": _edge_state(nodes, source, inp).strip(" ()")
                                 or "ok"})
    return out


def _ids(nodes: dict[str, Node]) -> dict[str, str]:
    return {key: f"a{i}" for i, key in enumerate(sorted(nodes))}


def diagram_parts(nodes: dict[str, Node]):
    """([(id, stage, artifact key, short sha256)], [(source id, target id, input name)]):
    the nodes and edges both diagram syntaxes draw, in a stable order."""
    ids = _ids(nodes)
    boxes = [(ids[key], node.stage, key, (node.sha256 or "?")[:12]) for key, node in sorted(nodes.items())]
    edges = [(ids[source], ids[key], name) for key, node in sorted(nodes.items())
             for name, (source, _) in node.inputs.items() if source in ids]
    return boxes, edges


def to_mermaid(start: str, nodes: dict[str, Node]) -> str:
    boxes, edges = diagram_parts(nodes)
    lines = ["flowchart BT"]
    lines += [f'    {i}["{stage}<br/>{key}<br/>{sha}"]' for i, stage, key, sha in boxes]
    lines += [f"    {a} -->|{name}| {b}" for a, b, name in edges]
    return "\n".join(lines) + "\n"


def to_dot(start: str, nodes: dict[str, Node]) -> str:
    boxes, edges = diagram_parts(nodes)
    lines = ["digraph lineage {", "  rankdir=BT;", "  node [shape=box];"]
    lines += [f'  {i} [label="{stage}\\n{key}\\n{sha}"];' for i, stage, key, sha in boxes]
    lines += [f'  {a} -> {b} [label="{name}"];' for a, b, name in edges]
    return "\n".join(lines + ["}"]) + "\n"


def find_records(top: Path) -> list[Path]:
    """Every provenance record under ``top`` (hidden, VCS and environment dirs skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if f == artifacts.PROVENANCE or f.endswith(f".{artifacts.PROVENANCE}")]
    return found


def all_nodes(top: Path, root: Path) -> dict[str, Node]:
    nodes = {}
    for record_file in find_records(top):
        node = load_node(artifact_of_record(record_file), root)
        nodes[node.key] = node
    return nodes


class Hasher:
    """sha256 of files, each read once per verify (an artifact's files are also its consumers' inputs)."""

    def __init__(self):
        self.cache: dict[Path, str] = {}

    def __call__(self, file: Path) -> str:
        file = Path(os.path.abspath(file))
        if file not in self.cache:
            self.cache[file] = artifacts.sha256_file(file)
        return self.cache[file]


def verify_node(node: Node, root: Path | None = None, sha: Hasher | None = None) -> list[str]:
    """One line per way the artifact no longer matches its record: a payload file changed,
    missing or added (hidden ones too), its ``config.yaml`` sidecar edited, an input whose
    producer records other content than this artifact read, or an input's producer that is gone."""
    sha = sha or Hasher()
    art = node.record.get("artifact")
    where = f"{node.key} [{node.stage}]"
    if not art or "files" not in art:
        return [f"UNRECORDED {where}: {node.record_file} has no content record (written before lineage; "
                "rerun its stage)"]
    base, problems = node.record_file.parent, []
    for rel, recorded in sorted(art["files"].items()):
        file = base / rel
        if not file.is_file():
            problems.append(f"MISSING {file} in {where}: recorded sha256 {recorded[:12]}")
        elif (now := sha(file)) != recorded:
            problems.append(f"MODIFIED {file} in {where}: recorded sha256 {recorded[:12]}, now {now[:12]}")
    if node.record_file.name == artifacts.PROVENANCE:
        for rel in sorted(set(artifacts.file_hashes(base, sha)) - set(art["files"])):
            problems.append(f"ADDED {base / rel} in {where}: not in the record")
    problems += _verify_sidecar(node, where)
    if root is not None:
        problems += _verify_edges(node, root, where)
    return problems


def _verify_sidecar(node: Node, where: str) -> list[str]:
    """The ``config.yaml`` beside the record must still hash to the record's ``config_hash``."""
    config_file = node.record_file.with_name(node.record_file.name.replace(artifacts.PROVENANCE, artifacts.CONFIG))
    recorded = node.record.get("config_hash")
    if recorded is None:
        return []
    if not config_file.is_file():
        return [f"MISSING {config_file} in {where}: the config sidecar of config_hash {recorded[:12]}"]
    try:
        now = cl_config.config_hash(OmegaConf.to_container(OmegaConf.load(config_file)))
    except Exception as err:  # not YAML any more
        return [f"MODIFIED {config_file} in {where}: unreadable ({str(err).splitlines()[0]})"]
    if now != recorded:
        return [f"MODIFIED {config_file} in {where}: config_hash recorded {recorded[:12]}, now {now[:12]}"]
    return []


def recorded_input_hash(producer: Node, path: Path) -> str | None:
    """What ``producer``'s record says the content of ``path`` (the artifact, a file or a
    subdir of it) is, computed as :func:`closedloop.artifacts.content_hash` would; None when the
    record does not cover it."""
    art = producer.record.get("artifact") or {}
    files, base = art.get("files"), producer.record_file.parent
    if files is None:
        return None
    if Path(os.path.abspath(path)) == Path(os.path.abspath(artifact_of_record(producer.record_file))):
        return art.get("sha256")
    try:
        rel = Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(base))).as_posix()
    except ValueError:
        return None
    if rel in files:
        return files[rel]
    inside = {k[len(rel) + 1:]: v for k, v in files.items() if k.startswith(rel + "/")}
    return artifacts.manifest_hash(inside) if inside else None


def _verify_edges(node: Node, root: Path, where: str) -> list[str]:
    """Each input as consumed: its producer still exists, and the content this artifact read is
    what the producer recorded (record against record: a file changed on disk since is the
    producer's own MODIFIED line, not repeated here)."""
    problems = []
    for name, (source, inp) in sorted(node.inputs.items()):
        if source is None:
            continue
        producer_path = _resolve(source, root)
        if artifacts.record_path(producer_path) is None:
            problems.append(f"MISSING PRODUCER {source} of input '{name}' of {where}: deleted, but {node.key} "
                            "was made from it")
            continue
        producer = load_node(producer_path, root)
        recorded = recorded_input_hash(producer, _resolve(inp.get("path", ""), root))
        if inp.get("sha256") and recorded and recorded != inp["sha256"]:
            problems.append(f"STALE {where}: input '{name}' {inp.get('path')} was sha256 {inp['sha256'][:12]} when "
                            f"it was read, its producer {source} [{producer.stage}] records {recorded[:12]}")
    return problems


def ranks(nodes: dict[str, Node]) -> dict[str, int]:
    """Depth of each artifact in the DAG: 0 for data, 1 + the deepest producer otherwise."""
    memo: dict[str, int] = {}

    def depth(key: str, seen: frozenset) -> int:
        if key not in memo:
            if key in seen:
                raise LineageError(f"{key}: provenance records form a cycle")
            parents = [s for s, _ in nodes[key].inputs.values() if s in nodes]
            memo[key] = 1 + max((depth(p, seen | {key}) for p in parents), default=-1)
        return memo[key]

    return {key: depth(key, frozenset()) for key in nodes}


def restore_mtimes(root: Path) -> int:
    """Give every artifact an mtime in DAG order (producers older than consumers), the files no
    stage produced (a user's JSONL) the oldest and every ``.dvc`` and ``dvc.yaml`` file the
    newest, so Snakemake sees a pulled run as up to date; returns the count.

    A ``git clone`` + ``dvc pull`` leaves mtimes in checkout order, which Snakemake's mtime
    trigger reads as "inputs newer than outputs". The order comes from the records, not
    from clocks, so runs moved between machines (or Slurm nodes) are treated alike.
    """
    nodes = all_nodes(root, root)
    depth = ranks(nodes)
    base = time.time() - (max(depth.values(), default=0) + 2)
    for node in nodes.values():
        for source, inp in node.inputs.values():
            raw = _resolve(inp.get("path", ""), root)
            if source is None and inp.get("path") and raw.is_file():
                os.utime(raw, (base - 1, base - 1))
    for key, node in nodes.items():
        t = base + depth[key]
        art = node.record.get("artifact") or {}
        files = [node.record_file.parent / rel for rel in art.get("files", {})]
        files += [node.record_file, node.record_file.with_name(
            node.record_file.name.replace(artifacts.PROVENANCE, artifacts.CONFIG))]
        artifact = artifact_of_record(node.record_file)
        if artifact.is_dir():
            files += [p for p in artifact.rglob("*") if p.is_file()]
        for file in files:
            if file.exists():
                os.utime(file, (t, t))
        if artifact.is_dir():
            for d in sorted((p for p in artifact.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                os.utime(d, (t, t))
            os.utime(artifact, (t, t))
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for f in filenames:
            if f.endswith(".dvc") or f == "dvc.yaml":
                os.utime(Path(dirpath) / f, (now, now))
    return len(nodes)


def _root(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    return dvc_store.repo_root(Path.cwd()) or Path.cwd().resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="closedloop lineage", description=__doc__.splitlines()[0],
                                     epilog="also: closedloop lineage {verify,push,pull,restore-mtimes} --help")
    parser.add_argument("path", help="an artifact, or a file inside one")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the lineage graph as JSON")
    fmt.add_argument("--mermaid", action="store_true", help="a Mermaid flowchart")
    fmt.add_argument("--dot", action="store_true", help="a Graphviz digraph")
    parser.add_argument("--root", default=None, help="where the pipeline ran (default: the DVC repo, else .)")
    return parser


def _action_parser(action: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"closedloop lineage {action}")
    parser.add_argument("--root", default=None, help="where the pipeline ran (default: the DVC repo, else .)")
    if action == "verify":
        parser.add_argument("path", nargs="?", default=None,
                            help="an artifact (checks its whole lineage) or a directory (every artifact in it)")
    if action in ("push", "pull"):
        parser.add_argument("-r", "--remote", default=None, help="DVC remote name (default: the repo's default)")
        parser.add_argument("-j", "--jobs", type=int, default=None)
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``closedloop lineage``; returns the exit status."""
    actions = ("verify", "push", "pull", "restore-mtimes")
    try:
        if argv[:1] and argv[0] in actions:
            args = _action_parser(argv[0]).parse_args(argv[1:])
            return _run_action(argv[0], args, _root(args.root))
        args = _parser().parse_args(argv)
        root = _root(args.root)
        start, nodes = graph(_resolve(args.path, Path.cwd()), root)
    except (LineageError, dvc_store.DVCRecordError) as err:
        print(f"closedloop lineage: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(start, nodes), indent=2))
    elif args.mermaid:
        print(to_mermaid(start, nodes), end="")
    elif args.dot:
        print(to_dot(start, nodes), end="")
    else:
        print(render_tree(start, nodes), end="")
    return 0


def _run_action(action: str, args, root: Path) -> int:
    if action == "verify":
        target = _resolve(args.path, Path.cwd()) if args.path else root
        if not target.exists():
            raise LineageError(f"{target}: no such file or directory")
        if args.path and artifacts.producer_of(target) is not None:
            _, nodes = graph(target, root)
        else:
            nodes = all_nodes(target, root)
        sha = Hasher()
        bad = {key: verify_node(node, root, sha) for key, node in sorted(nodes.items())}
        bad = {key: lines for key, lines in bad.items() if lines}
        for lines in bad.values():
            print("\n".join(lines))
        print(f"verify: {len(nodes)} artifacts checked, {len(bad)} no longer match their record"
              + (f": {', '.join(bad)}" if bad else ""), file=sys.stderr)
        return 1 if bad else 0
    if dvc_store.repo_root(root) is None:
        raise LineageError(f"{root}: not inside a DVC repository (run `dvc init` there)")
    if action == "push":
        print(f"push: {dvc_store.push(root, args.remote, args.jobs)} files pushed")
    elif action == "pull":
        print(f"pull: {dvc_store.pull(root, args.remote, args.jobs)}")
    if action in ("pull", "restore-mtimes"):
        print(f"restore-mtimes: {restore_mtimes(root)} artifacts in DAG order")
    return 0
