"""A deployment's class reaches its replicas by value (cloudpickle: its module holds the Deployment, not the class),
so its module's imports do not run there; ``load_in_replica`` makes every stage import them as it starts instead
of during its first request (0.7 s measured in the BusinessFilter before)."""
from __future__ import annotations

import subprocess
import sys

import cloudpickle
import pytest

from serve.business_filter import BusinessFilter
from serve.events import EventSink
from serve.reranker import Reranker
from serve.retriever import Retriever
from serve.text_encoder import TextEncoder

CHECK = """
import pickle, sys
cls = pickle.loads(open(sys.argv[1], "rb").read())
module = cls.__module__
before = module in sys.modules
cls.__init__.__globals__["load_in_replica"](object.__new__(cls))  # what __init__ calls first
print(module, before, module in sys.modules, "common.ranking" in sys.modules)
"""


def _replica(deployment, tmp_path) -> tuple[str, bool, bool, bool]:
    path = tmp_path / "cls.pkl"
    path.write_bytes(cloudpickle.dumps(deployment.func_or_class))  # as Serve ships it
    out = subprocess.run([sys.executable, "-c", CHECK, str(path)], capture_output=True, text=True, check=True)
    module, *flags = out.stdout.split()
    return module, *(f == "True" for f in flags)


@pytest.mark.parametrize("deployment", [Retriever, Reranker, BusinessFilter, EventSink, TextEncoder])  # not the
# Ingress: its class holds the FastAPI app, which cloudpickle cannot ship on its own (Serve ships it its own way)
def test_every_stage_imports_its_module_as_it_starts(deployment, tmp_path):
    module, _, after, ranking = _replica(deployment, tmp_path)
    assert module == deployment.func_or_class.__module__
    assert after and ranking


def test_unpickling_alone_leaves_the_filters_module_unimported(tmp_path):
    _, before, _, _ = _replica(BusinessFilter, tmp_path)
    assert not before  # why load_in_replica is needed: nothing else in the class refers to its module
