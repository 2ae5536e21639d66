"""jaxddp's imports point down the layers, with no circle.

Each module may import modules of its own layer or of the layers below it (the list
below, bottom first), never above; and the import graph has no circle, imports inside
functions included (a deferred import hides a circle from Python, not from a reader).
A new module must be placed in a layer here; the README's layout section lists the same
layers. The graph is read from the source (ast), so nothing is imported.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxddp")

# Bottom first. A name is a module (jaxddp.X) or a package (every module under jaxddp/X/).
LAYERS = (
    ("errors",),  # ConfigError: every layer raises it
    ("registry",),  # names -> entries, for every choice a config makes by name
    ("nn",),  # layers: GhostBatchNorm, masked Dense/Conv
    ("state", "metrics", "default_config", "recipe"),  # plain data; the resolved recipe
    ("optim", "losses", "flops"),  # optimizers and the learning rate; losses; FLOPs counting
    ("sparsity",),  # masks and their schedule
    ("models", "data"),  # the model and dataset registries and their entries
    ("pruning",),  # data pruning: scores, selection, the per-example tables, InfoBatch
    ("steps",),  # one training step, one evaluation step (pure functions)
    # backends, checkpoints, multi-host, the run's directory (held by one run at a time)
    ("parallel", "checkpoint", "distributed", "workdir"),
    ("evaluate",),  # whole-split evaluation and per-example outputs
    ("config",),  # validation of a whole config against every registry
    ("search_space", "study"),  # a study's space; its storage, queue and results
    ("train",),  # the run, top to bottom
    ("command_line",),  # flags parsed with one-line errors, for every command line
    ("main", "score", "tune"),  # command lines (tune: studies of many runs)
    ("scaling", "cascade"),  # planning from finished runs
    ("__init__",),  # the public API
)


def _modules() -> dict[str, str]:
  """{"jaxddp.models.cnn": path, "jaxddp.models": path of models/__init__.py, ...}"""
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for file in files:
      if file.endswith(".py"):
        parts = os.path.relpath(os.path.join(root, file), os.path.dirname(PACKAGE))
        name = parts[:-3].replace(os.sep, ".")
        modules[name.removesuffix(".__init__")] = os.path.join(root, file)
  return modules


def _unit(module: str) -> str:
  """The layer name of a module: jaxddp.models.cnn -> models, jaxddp -> __init__."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
  """The jaxddp modules `module` imports anywhere in its source."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith("__init__.py")
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from . import x, from .layers import y
        anchor = module.split(".")[:len(module.split(".")) + (1 if is_package else 0) - node.level]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:  # a submodule, or an attribute of `base`
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {name for name in found if name in modules and name != module}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
  placed = {name for layer in LAYERS for name in layer}
  missing = sorted({_unit(module) for module in _graph()} - placed)
  assert not missing, f"place these in a layer of tests/test_imports.py: {missing}"


def test_imports_point_down_the_layers():
  level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
  upward = [f"{module} imports {target} ({_unit(target)} is above {_unit(module)})"
            for module, targets in sorted(_graph().items()) for target in sorted(targets)
            if level[_unit(target)] > level[_unit(module)]]
  assert not upward, "\n".join(upward)


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm),
  plus any module that imports itself."""
  index, low, on_stack, stack, circles = {}, {}, set(), [], []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in sorted(graph.get(node, ())):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1 or node in graph.get(node, ()):
        circles.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return circles


def test_no_import_circle():
  circles = find_circles(_graph())
  assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"a"}}, [["a"]]),
])
def test_find_circles_finds_a_circle(graph, expected):
  assert find_circles(graph) == expected
