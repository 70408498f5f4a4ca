"""The MCTS tree of SPEC §2 as plain data: PUCT selection, backup, commit, pairs.

No model in here: the search (:mod:`closedloop.loop.search`) fills nodes with generated steps, priors and
self-evaluations; this module does the arithmetic, so tests can check it by hand.

Conventions (SPEC §2): a node is a partial solution; ``q`` on a node is Q(parent, a)
for the action that led to it, ``n`` is N(parent, a) (= visits of the node), ``v`` is
the backed-up V(s), ``value`` is v(s) = C(s) (+ the outcome reward O at a terminal
node) and ``reward`` is r(parent, a) = v(s) − v(parent). A new node starts with
V = 0 and Q = r (no lookahead yet); the root has v = 0.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field


@dataclass
class Node:
    id: int
    parent: int | None
    text: str  # the step (action) that led here; "" at the root
    depth: int
    prior: float = 1.0
    self_eval: float | None = None
    value: float = 0.0
    reward: float = 0.0
    q: float = 0.0
    v: float = 0.0
    visits: int = 0
    terminal: bool = False
    correct: bool | None = None
    n_tokens: int = 0
    children: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """A generated next step, scored: what :func:`add_children` needs."""

    text: str
    prior: float
    self_eval: float
    terminal: bool
    correct: bool | None
    n_tokens: int


def length_normalised_prior(sum_logprob: float, n_tokens: int, lam: float) -> float:
    """p(a|s) = exp(Σ log p(tokens of a) / |a|^λ) (SPEC §2)."""
    return math.exp(sum_logprob / max(n_tokens, 1) ** lam)


def node_value(self_eval: float, terminal: bool, correct: bool | None, depth: int,
               outcome_reward: float = 1.0, depth_scaled: bool = False) -> float:
    """v(s) = C(s) + O at a terminal node, O = ±outcome_reward (SPEC §2).

    ``depth_scaled`` is the reference code's variant: C / max(depth − 3, 1).
    """
    c = self_eval / max(depth - 3, 1) if depth_scaled else self_eval
    if terminal:
        c += outcome_reward if correct else -outcome_reward
    return c


class Tree:
    """One search tree over the solution of one question."""

    def __init__(self):
        self.nodes: list[Node] = [Node(id=0, parent=None, text="", depth=0)]

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def __getitem__(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def steps(self, node_id: int) -> list[str]:
        """The step texts from the root down to ``node_id``."""
        out = []
        node = self.nodes[node_id]
        while node.parent is not None:
            out.append(node.text)
            node = self.nodes[node.parent]
        return out[::-1]

    def add_children(self, parent_id: int, candidates: list[Candidate], max_children: int,
                     outcome_reward: float = 1.0, depth_scaled: bool = False) -> list[int]:
        """Attach de-duplicated candidates (at most ``max_children`` in all); returns new ids."""
        parent = self.nodes[parent_id]
        seen = {self.nodes[c].text.strip() for c in parent.children}
        new_ids = []
        for cand in candidates:
            key = cand.text.strip()
            if not key or key in seen or len(parent.children) >= max_children:
                continue
            seen.add(key)
            depth = parent.depth + 1
            value = node_value(cand.self_eval, cand.terminal, cand.correct, depth, outcome_reward, depth_scaled)
            node = Node(id=len(self.nodes), parent=parent_id, text=cand.text, depth=depth, prior=cand.prior,
                        self_eval=cand.self_eval, value=value, reward=value - parent.value,
                        terminal=cand.terminal, correct=cand.correct, n_tokens=cand.n_tokens)
            node.q = node.reward  # Q = r + γ·V with V = 0 before any lookahead
            self.nodes.append(node)
            parent.children.append(node.id)
            new_ids.append(node.id)
        return new_ids

    def puct(self, parent: Node, child: Node, c_puct: float) -> float:
        """Q(s,a) + c_puct · p(a|s) · sqrt(N(s)) / (1 + N(s,a)) (SPEC §2)."""
        return child.q + c_puct * child.prior * math.sqrt(parent.visits) / (1 + child.visits)

    def select(self, start: int, c_puct: float) -> list[int]:
        """Descend by PUCT from ``start`` to a leaf (unexpanded or terminal); the path."""
        path = [start]
        node = self.nodes[start]
        while node.children and not node.terminal:
            node = max((self.nodes[c] for c in node.children), key=lambda ch: self.puct(node, ch, c_puct))
            path.append(node.id)
        return path

    def backup(self, path: list[int], gamma: float = 1.0) -> None:
        """N ← N + 1 along the path; Q(s,a) ← r + γ·V(s'); V(s) ← Σ N·Q / Σ N (SPEC §2).

        A leaf's V is the mean Q of its fresh children (one-step lookahead), 0 if it has none.
        """
        for node_id in path:
            self.nodes[node_id].visits += 1
        leaf = self.nodes[path[-1]]
        if leaf.children and not any(self.nodes[c].visits for c in leaf.children):
            leaf.v = sum(self.nodes[c].q for c in leaf.children) / len(leaf.children)
        for node_id in reversed(path[:-1]):
            node = self.nodes[node_id]
            for c in node.children:
                child = self.nodes[c]
                child.q = child.reward + gamma * child.v
            visited = [self.nodes[c] for c in node.children if self.nodes[c].visits > 0]
            node.v = sum(ch.visits * ch.q for ch in visited) / sum(ch.visits for ch in visited)

    def best_child(self, node_id: int) -> int:
        """The child to commit to: most visits, then highest Q, then first generated."""
        children = [self.nodes[c] for c in self.nodes[node_id].children]
        return max(children, key=lambda ch: (ch.visits, ch.q, -ch.id)).id


def alpha(n_chosen: int, n_rejected: int) -> float:
    """Label smoothing α = min(N_l / (N_w + N_l), 0.5) (SPEC §3); 0.5 when neither was visited."""
    total = n_chosen + n_rejected
    return 0.5 if total == 0 else min(n_rejected / total, 0.5)


def preference_pairs(tree: Tree, committed: list[int], rejected: str = "lowest_q",
                     rng: random.Random | None = None) -> list[dict]:
    """Step-level pairs along the committed path: chosen = highest-Q sibling, rejected =
    lowest-Q sibling (or a random non-best one), per SPEC §2. Prompt text is added by
    the caller; here ``parent`` names the node whose steps form the shared prefix.
    Siblings with equal Q carry no preference and give no pair; ``dpo.min_q_margin``
    filters near-ties at training time."""
    pairs = []
    for parent_id in committed:
        children = [tree[c] for c in tree[parent_id].children]
        if len(children) < 2:
            continue
        ranked = sorted(children, key=lambda ch: (-ch.q, ch.id))
        best = ranked[0]
        if rejected == "random":
            worst = (rng or random.Random(0)).choice(ranked[1:])
        else:
            worst = ranked[-1]
        if best.q <= worst.q:
            continue  # no preference to learn
        pairs.append({"parent": parent_id, "chosen_id": best.id, "rejected_id": worst.id,
                      "chosen": best.text, "rejected": worst.text, "q_chosen": best.q, "q_rejected": worst.q,
                      "n_chosen": best.visits, "n_rejected": worst.visits,
                      "alpha": alpha(best.visits, worst.visits), "depth": tree[parent_id].depth})
    return pairs
