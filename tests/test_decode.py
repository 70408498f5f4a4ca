"""The MCTS decode loop (closedloop.decode): per-row stop rules, log-probs and C(s) equal to a
fresh full forward, pruning/refill independent of the batch, and a search that does not
depend on the other trees of its batch (SPEC §1–2)."""

import copy

import pytest
import torch
from transformers import TopPLogitsWarper

from closedloop import generation, models, selfeval, synthetic
from closedloop.decode import Decoder, Request, decode_all, greedy_generate, top_p_filter
from closedloop.loop import search
from closedloop.prefix_cache import QuestionCache

pytestmark = pytest.mark.slow

QUESTIONS = ["<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nA much longer question, padded on the left.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture
def tiny(smoke_cfg):
    torch.set_num_threads(1)
    return models.load_base(smoke_cfg.model)


def requests_for(tok, question_cache: bool) -> list[Request]:
    contexts = [QUESTIONS[0], QUESTIONS[1] + "First step.\nSecond step is longer.\n", QUESTIONS[0] + "Go.\n",
                QUESTIONS[1], QUESTIONS[1]]  # the last two share one prefill
    out = [Request(tok(c, add_special_tokens=False)["input_ids"], 12 if k % 2 else 30, one_line=k % 2 == 0,
                   seed=100 + k, tree=[0, 1, 0, 1, 1][k] if question_cache else None, score=True)
           for k, c in enumerate(contexts)]
    out.append(Request(tok("Count: one two", add_special_tokens=False)["input_ids"], 9, one_line=False, seed=7,
                       score=True))  # no question cache row: prefilled from scratch
    return out


@pytest.mark.parametrize(("max_rows", "max_dead"), [(1, 0.25), (2, 0.25), (6, 0.0), (6, 0.25), (6, 1.0)])
def test_log_probs_and_confidence_equal_a_fresh_forward(tiny, max_rows, max_dead, monkeypatch):
    """Each sampled token's log-prob and the row's C(s), read from the pruned/refilled batch
    cache, equal a full forward pass over the row's own tokens (finished rows' slots
    compacted at once, kept until a refill, or kept to the end; cache buffers regrown
    every 5 columns)."""
    from closedloop import decode

    monkeypatch.setattr(decode._GrowingLayer, "spare", 5)
    model, tok = tiny
    decoder = Decoder(model, tok, temperature=1.0, top_p=1.0, max_rows=max_rows,
                      question_cache=QuestionCache(model, tok, QUESTIONS), max_dead=max_dead)
    results = decode_all(decoder, requests_for(tok, question_cache=True))
    suffix = tok(selfeval.eval_suffix(tok), add_special_tokens=False)["input_ids"]
    for res in results:
        p_ids = res.request.prompt_ids
        ids = torch.tensor([p_ids + res.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(p_ids) - 1:-1].float(), -1)
        manual = logp.gather(1, ids[0, len(p_ids):].unsqueeze(1)).squeeze(1)
        assert res.logprobs == pytest.approx(manual.tolist(), abs=1e-3)
        assert res.sum_logprob == pytest.approx(float(manual[:res.n_tokens].sum()), abs=1e-3)
        fresh = selfeval.confidence_from_ids(model, tok, [p_ids + list(res.token_ids) + suffix])[0]
        assert res.confidence == pytest.approx(fresh, abs=1e-4)
    assert decoder.rows == [] and decoder.slots == [] and decoder.cache is None
    qc = decoder.question_cache
    assert not qc.extends(1, tok(QUESTIONS[0], add_special_tokens=False)["input_ids"])  # falls back to a prefill


def test_pruning_and_refill_give_each_row_its_tokens_alone(tiny):
    """A row's tokens depend only on its prompt and its generator seed: batched with
    pruning and refill (2 slots, question cache) = the row decoded alone from scratch."""
    model, tok = tiny
    batched = decode_all(Decoder(model, tok, temperature=0.8, top_p=0.9, max_rows=2,
                                 question_cache=QuestionCache(model, tok, QUESTIONS)),
                         requests_for(tok, question_cache=True))
    for res in batched:
        alone_request = copy.copy(res.request)
        alone_request.tree = None
        alone = decode_all(Decoder(model, tok, temperature=0.8, top_p=0.9, max_rows=1), [alone_request])[0]
        assert alone.tokens == res.tokens
        assert alone.logprobs == pytest.approx(res.logprobs, abs=1e-4)


class Scripted:
    """The tiny model with its next token forced by absolute position q:
    EOS at q == 40, a newline where q % 7 == 0, else one word token."""

    def __init__(self, model, tok):
        self.model, self.config, self.generation_config = model, model.config, model.generation_config
        self.device, self.dtype = model.device, model.dtype
        self.word = tok(" x", add_special_tokens=False)["input_ids"][0]
        self.newline = tok("\n", add_special_tokens=False)["input_ids"][0]
        self.eos = tok.eos_token_id

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        q = kwargs["position_ids"][:, -1] + 1
        forced = torch.where(q == 40, self.eos, torch.where(q % 7 == 0, self.newline, self.word))
        logits = torch.full_like(out.logits[:, -1, :], -30.0)
        logits.scatter_(1, forced.unsqueeze(1), 30.0)
        out.logits[:, -1, :] = logits
        return out


def test_stop_rules_per_row(tiny):
    """Each row stops on its own rule while the others go on: end of its first non-empty
    line, EOS (not part of the step; the solution ended), max tokens."""
    model, tok = tiny
    scripted = Scripted(model, tok)
    w = scripted.word

    def req(n, max_new, one_line):
        return Request([w] * n, max_new, one_line=one_line, seed=n)

    cases = [req(10, 20, True),   # q = 10..: newline at 14 -> a line of 4 words
             req(14, 20, True),   # newline first (empty line, skipped), words 15..20, newline at 21
             req(36, 20, False),  # EOS at q = 40 -> 4 tokens, ended
             req(36, 20, True),   # EOS before any newline: ended
             req(15, 6, False),   # max tokens
             req(30, 20, False)]  # no stop at newlines in a completion: runs into EOS at 40
    results = decode_all(Decoder(scripted, tok, temperature=1.0, top_p=1.0, max_rows=3), cases)
    nl, eos = scripted.newline, scripted.eos
    assert results[0].tokens == [w] * 4 + [nl] and not results[0].ended and results[0].text == "x x x x"
    assert results[1].tokens == [nl] + [w] * 6 + [nl] and results[1].text == "x x x x x x"
    assert results[2].tokens == [w] * 4 + [eos] and results[2].n_tokens == 4 and results[2].ended
    assert results[3].ended and results[3].n_tokens == 4 and results[3].token_ids == (w,) * 4
    assert results[4].tokens == [w] * 6 and not results[4].ended
    assert results[5].tokens == [w] * 5 + [nl] + [w] * 4 + [eos] and results[5].ended
    assert results[5].text == "x x x x x\n x x x x"


def test_top_p_filter_matches_transformers():
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for p in (0.3, 0.9, 1.0):
        expected = TopPLogitsWarper(p)(None, scores.clone()) if p < 1 else scores
        assert torch.equal(top_p_filter(scores, p), expected)


def test_a_tree_does_not_depend_on_the_rest_of_its_batch(tiny, smoke_cfg):
    """Same seed: a tree searched in a batch of three has the same steps and visit counts as
    searched alone, and two runs give identical trees (determinism)."""
    model, tok = tiny
    rows = synthetic.generate("t", 3, 2, 3, 20, 1)
    m = smoke_cfg.mcts

    def run_search(batch):
        torch.manual_seed(11)
        return search.Searcher(model, tok, m, "p").search(batch)

    together = run_search(rows)
    assert [t.nodes for t, _ in run_search(rows)] == [t.nodes for t, _ in together]
    alone, _ = run_search(rows[:1])[0]
    first, committed = together[0]
    assert [(n.text, n.visits, n.parent) for n in alone.nodes] == [(n.text, n.visits, n.parent) for n in first.nodes]
    assert [n.prior for n in alone.nodes] == pytest.approx([n.prior for n in first.nodes], abs=1e-5)
    assert committed and first[committed[-1]].terminal


def test_hinted_self_evaluation_and_gold_step_options_still_search(tiny, smoke_cfg):
    """The reference-code options take the full-prompt C(s) path (batched across trees)."""
    model, tok = tiny
    rows = synthetic.generate("t", 2, 2, 3, 20, 1)
    m = copy.deepcopy(smoke_cfg.mcts)
    m.self_eval_hint, m.add_gold_step = True, True
    torch.manual_seed(1)
    for tree, committed in search.Searcher(model, tok, m, "p").search(rows):
        assert tree[committed[-1]].terminal
        assert all(n.self_eval is not None and 0 <= n.self_eval <= 1 for n in tree.nodes[1:])
        assert any(n.parent == 0 for n in tree.nodes)


def test_greedy_decode_loop_equals_generate(tiny):
    """Evaluation's greedy path: the decode loop with 2 slots (so finished rows are refilled)
    gives each prompt the text and token count of transformers' greedy ``generate``."""
    model, tok = tiny
    prompts = QUESTIONS + ["Count: one two", QUESTIONS[0] + "Sure.", "x"]
    expected, n_expected = generation.generate(model, tok, prompts, max_new_tokens=11, batch_size=len(prompts))
    texts, n_tokens = greedy_generate(model, tok, prompts, max_new_tokens=11, max_rows=2)
    assert texts == expected
    assert n_tokens == n_expected


def test_greedy_stops_each_row_after_its_final_answer(tiny):
    """``stop_at_answer``: a row ends once its completion states "The answer is N." (before
    the line's newline), while a row that has not got there yet goes on; the scripted model
    writes the answer from absolute position 30, so the shorter prompt writes more filler."""
    model, tok = tiny
    answer = tok(" The answer is 7.\n", add_special_tokens=False)["input_ids"]
    filler = tok(" x", add_special_tokens=False)["input_ids"][0]

    class Answering:
        def __init__(self):
            self.config, self.generation_config = model.config, model.generation_config
            self.device, self.dtype = model.device, model.dtype

        def __call__(self, **kwargs):
            out = model(**kwargs)
            for row, q in enumerate((kwargs["position_ids"][:, -1] + 1).tolist()):
                at = q - 30
                out.logits[row, -1, :] = -30.0
                out.logits[row, -1, answer[at] if 0 <= at < len(answer) else filler] = 30.0
            return out

    prompts = ["y" + " y" * 19, "y" + " y" * 24]
    assert [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts] == [20, 25]
    texts, n_tokens = greedy_generate(Answering(), tok, prompts, max_new_tokens=40, max_rows=2, stop_at_answer=True)
    stated = tok.decode(answer[:-1]).strip()  # up to the full stop
    assert texts == [["x " * 10 + stated], ["x " * 5 + stated]]
    assert n_tokens == (10 + 5) + 2 * (len(answer) - 1)
    plain, n_plain = greedy_generate(Answering(), tok, prompts, max_new_tokens=40, max_rows=2)
    assert n_plain == 80 and plain[0][0].startswith(texts[0][0])


@pytest.mark.parametrize("max_rows", [1, 3])
def test_a_continuation_from_a_kept_row_equals_a_prefilled_one(tiny, max_rows):
    """A request continuing a finished row's kept cache (Request.context: no prefill) samples
    the same tokens, log-probs and C(s) as the same prompt prefilled, and as a fresh forward;
    a context whose ids are not the prompt is ignored (prefilled instead)."""
    model, tok = tiny
    qc = QuestionCache(model, tok, QUESTIONS)
    first = [Request(tok(q, add_special_tokens=False)["input_ids"], 12, one_line=True, seed=3 + k, tree=k,
                     score=True, keep=True) for k, q in enumerate(QUESTIONS)]
    parents = decode_all(Decoder(model, tok, temperature=1.0, top_p=1.0, max_rows=2, question_cache=qc), first)
    assert all(p.context is not None and p.context.ids == p.request.prompt_ids + p.tokens for p in parents)

    def children(with_context):
        out = []
        for k, p in enumerate(parents):
            for j in range(2):
                out.append(Request(p.context.ids, 10, one_line=j == 0, seed=50 + 2 * k + j, tree=k, score=True,
                                   context=p.context if with_context else None))
        out.append(Request(parents[0].context.ids[:-1], 8, one_line=False, seed=9, tree=0, score=True,
                           context=parents[0].context))  # ids differ: prefilled
        return out

    def run(with_context):
        decoder = Decoder(model, tok, temperature=1.0, top_p=1.0, max_rows=max_rows, question_cache=qc)
        out = decode_all(decoder, children(with_context))
        assert decoder.continued == (4 if with_context else 0)
        return out

    continued, prefilled = run(True), run(False)
    suffix = tok(selfeval.eval_suffix(tok), add_special_tokens=False)["input_ids"]
    for a, b in zip(continued, prefilled, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)
        fresh = selfeval.confidence_from_ids(model, tok, [a.request.prompt_ids + list(a.token_ids) + suffix])[0]
        assert a.confidence == pytest.approx(fresh, abs=1e-4)


def test_growing_layer_equals_a_dynamic_layer():
    """_GrowingLayer.update returns what DynamicLayer.update does, through regrowth, a
    trimmed view, and a replaced (row-selected) tensor."""
    from transformers.cache_utils import DynamicLayer

    from closedloop.decode import _GrowingLayer

    gen = torch.Generator().manual_seed(0)
    grow, plain = _GrowingLayer(), DynamicLayer()
    grow.spare = 3
    rows, buffers = 3, []
    for step, n in enumerate([4, 1, 1, 1, 1, 2, 1, 5, 1]):
        k, v = torch.randn(rows, 2, n, 4, generator=gen), torch.randn(rows, 2, n, 4, generator=gen)
        got, want = grow.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if not buffers or buffers[-1][1] is not grow._kbuf:
            buffers.append((step, grow._kbuf))
        if step == 3:  # trim two leading columns (a view: stays in the buffer)
            for layer in (grow, plain):
                layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]
        if step == 6:  # keep rows 0 and 2 (a new tensor: regrown at the next update)
            for layer in (grow, plain):
                layer.batch_select_indices(torch.tensor([0, 2]))
            rows = 2
    assert [step for step, _ in buffers] == [0, 4, 7]  # allocated only when out of room or replaced
