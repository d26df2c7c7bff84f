"""Typed configs: ModelSpec / PoolConfig validation, YAML pools, the built-in `tiny` pool, cost."""

from __future__ import annotations

import pytest
import yaml

from haps.config import LoraTarget, ModelSpec, PoolConfig, cache_root, load_pool
from haps.errors import ConfigError


def _local(name: str, **kw) -> ModelSpec:
    return ModelSpec(name=name, backend="local", source_kind="hub", source=f"org/{name}", **kw)


def _api(name: str, **kw) -> ModelSpec:
    kw.setdefault("open_weights", False)
    kw.setdefault("base_url", "http://127.0.0.1:8000/v1")
    return ModelSpec(name=name, backend="api", source=name, **kw)


# ----------------------------------------------------------------------------- ModelSpec
def test_api_model_needs_closed_weights():
    with pytest.raises(ValueError, match="open_weights: false") as e:
        _api("gpt", open_weights=True)
    assert "'gpt'" in str(e.value)


def test_api_model_needs_base_url():
    with pytest.raises(ValueError, match="base_url"):
        _api("gpt", base_url=None)
    with pytest.raises(ValueError, match="base_url"):
        _api("gpt", base_url="")


def test_valid_api_model():
    m = _api("gpt", price_in=2.5, price_out=10.0)
    assert m.backend == "api" and not m.open_weights and m.base_url.startswith("http")


def test_local_model_needs_source():
    with pytest.raises(ValueError, match="needs a source"):
        ModelSpec(name="m", backend="local", source="")


def test_unknown_fields_and_literals_are_rejected():
    with pytest.raises(ValueError, match="pricein"):
        ModelSpec(name="m", source="x", pricein=1.0)
    with pytest.raises(ValueError, match="source_kind"):
        ModelSpec(name="m", source="x", source_kind="s3")
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(name="m", source="x", dtype="int4")
    with pytest.raises(ValueError, match="price_in"):
        ModelSpec(name="m", source="x", price_in=-1.0)


@pytest.mark.parametrize(
    ("p_in", "p_out", "n_in", "n_out", "expected"),
    [
        (0.0, 0.0, 1000, 1000, 0.0),
        (1.0, 2.0, 1_000_000, 0, 1.0),
        (1.0, 2.0, 0, 1_000_000, 2.0),
        (0.10, 0.40, 1234, 56, (1234 * 0.10 + 56 * 0.40) / 1e6),
        (2.5, 10.0, 300, 50, 300 * 2.5e-6 + 50 * 10.0e-6),
    ],
)
def test_cost_is_tokens_times_price_per_million(p_in, p_out, n_in, n_out, expected):
    m = _local("m", price_in=p_in, price_out=p_out)
    assert m.cost(n_in, n_out) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cost_is_linear():
    m = _local("m", price_in=0.3, price_out=1.7)
    assert m.cost(10, 20) + m.cost(5, 7) == pytest.approx(m.cost(15, 27))


# ----------------------------------------------------------------------------- PoolConfig
def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match=r"unique.*\['a'\]"):
        PoolConfig(models=[_local("a"), _local("b"), _local("a")])


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError, match="no models"):
        PoolConfig(models=[])


def test_unknown_model_lists_valid_names():
    pool = PoolConfig(models=[_local("a"), _api("b")])
    assert pool.get("b").backend == "api"
    assert pool.names == ["a", "b"]
    with pytest.raises(ConfigError) as e:
        pool.get("c")
    msg = str(e.value)
    assert "'c'" in msg and "'a'" in msg and "'b'" in msg


def test_lora_target_validation():
    assert LoraTarget().module_name == "self_attn.o_proj"
    assert LoraTarget().last_k_layers == 1
    with pytest.raises(ValueError, match="last_k_layers"):
        LoraTarget(last_k_layers=0)
    with pytest.raises(ValueError, match="rank"):
        LoraTarget(rank=0)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HAPS_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    pool = PoolConfig(models=[_local("a")], cache_dir=str(tmp_path / "cfg"))
    assert cache_root(pool) == tmp_path / "cfg"
    monkeypatch.delenv("HAPS_CACHE")
    assert cache_root(PoolConfig(models=[_local("a")])).name == "haps"


# ----------------------------------------------------------------------------- load_pool
def test_load_pool_from_yaml(tmp_path):
    cfg = {
        "name": "mine",
        "models": [
            {"name": "small", "source": "org/small", "price_in": 0.1, "price_out": 0.2},
            {"name": "closed", "backend": "api", "source": "gpt-x", "open_weights": False,
             "base_url": "http://localhost:9/v1", "api_key_env": "MY_KEY", "price_in": 1.0, "price_out": 4.0},
        ],
        "lora": {"last_k_layers": 2, "rank": 4, "alpha": 0.5},
    }
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(cfg))
    pool = load_pool(str(path))
    assert pool.name == "mine"
    assert pool.names == ["small", "closed"]
    assert pool.lora == LoraTarget(last_k_layers=2, rank=4, alpha=0.5)
    closed = pool.get("closed")
    assert closed.api_key_env == "MY_KEY" and not closed.open_weights
    assert closed.cost(1_000_000, 1_000_000) == pytest.approx(5.0)


def test_load_pool_invalid_yaml_content_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "c", "backend": "api", "source": "x"}]}))
    with pytest.raises(ConfigError, match="open_weights") as e:
        load_pool(str(path))
    assert "bad.yaml" in str(e.value)


def test_load_pool_errors(tmp_path):
    with pytest.raises(ConfigError, match="tiny"):  # names the built-in pools
        load_pool(str(tmp_path / "missing.yaml"))
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_pool(str(notmap))
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pool(str(broken))


def test_builtin_tiny_pool():
    pool = load_pool("tiny")
    assert pool.name == "tiny"
    assert len(pool.names) == 2 and len(set(pool.names)) == 2
    for m in pool.models:
        assert m.backend == "local" and m.open_weights and m.source_kind == "gguf_package"
        assert m.description
        assert m.price_in > 0 and m.price_out > 0
    gemma = next(m for m in pool.models if "gemma" in m.name)
    assert gemma.completion_style and gemma.chat_template
    # two calls build independent configs (mutating one leaves the other alone)
    other = load_pool("tiny")
    other.models[0].price_in = 99.0
    assert load_pool("tiny").models[0].price_in != 99.0


def test_auto_weights_dtype_is_bf16_only_where_native(monkeypatch):
    from haps import dtypes

    spec = ModelSpec(name="m", backend="local", source_kind="folder", source="/x", dtype="auto")
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert spec.weights_dtype == "float32"
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert spec.weights_dtype == "bfloat16"
    assert ModelSpec(name="m", backend="local", source_kind="folder", source="/x",
                     dtype="float16").weights_dtype == "float16"


def test_builtin_tiny_auto_is_tiny_at_dtype_auto():
    tiny, auto = load_pool("tiny"), load_pool("tiny-auto")
    assert [m.name for m in auto.models] == [m.name for m in tiny.models]
    assert {m.dtype for m in tiny.models} == {"float32"} and {m.dtype for m in auto.models} == {"auto"}
    strip = [m.model_dump(exclude={"dtype"}) for m in auto.models]
    assert strip == [m.model_dump(exclude={"dtype"}) for m in tiny.models]  # nothing else differs
