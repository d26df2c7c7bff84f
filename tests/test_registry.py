import pytest

from haps.errors import ConfigError
from haps.registry import class_registrar
from haps.routers import get_router
from haps.routing.base import ROUTERS
from haps.workflows import WORKFLOWS, get_workflow


def test_registrar_names_classes_and_refuses_a_second_class_under_one_name():
    store = {}
    register = class_registrar(store, "widget")

    @register("a")
    class A:
        pass

    assert store == {"a": A} and A.name == "a"
    register("a")(A)  # the same class again is fine
    with pytest.raises(ConfigError, match="widget name 'a' is already registered by A"):
        register("a")(type("B", (), {}))


def test_builtin_routers_and_workflows_are_registered():
    get_workflow("mmlu")
    assert {"hotpotqa", "mmlu"} <= set(WORKFLOWS)
    with pytest.raises(ConfigError, match="known routers"):  # lookup loads the built-in routers first
        get_router("no-such-router", space=None)
    assert {"fixed", "random", "high_level"} <= set(ROUTERS)
