"""A policy's structure as plain JSON data, so that opening a saved run runs no code.

`Run.save` writes the structure of `run.policy` (classes, static fields, array shapes and
dtypes) to `policy.json` and its arrays to `policy.eqx`; `load_run` rebuilds an abstract
skeleton from the JSON and fills it with `eqx.tree_deserialise_leaves`. Only classes and
functions on an allow-list can be named in the JSON: diffsim's policies and the functions
they hold, plus whatever the user registers with `register_policy`. A name off the list
is an error, never an import.

A module is rebuilt the way `jax.tree_util.tree_unflatten` rebuilds it: `object.__new__`
and one `object.__setattr__` per dataclass field, without calling `__init__`. So every
field is stored (not a guess at constructor arguments), a seed or sweep axis is just part
of each array's shape, and a field added to a class later is reported as a version
mismatch rather than silently dropped.

The JSON tree, one node per value:

- `{"module": NAME, "fields": {field: node, ...}}` for an `eqx.Module`;
- `{"array": [shape], "dtype": "float32", "numpy": false}` for an array;
- `{"tuple": [...]}`, `{"list": [...]}`, `{"dict": {key: node}}`;
- `{"function": NAME}` for a function held in a field (an activation);
- `null`, booleans, numbers and strings as themselves.
"""

import dataclasses
import inspect
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _networks, policies

FORMAT = "diffsim.policy/1"

_ACTIVATIONS = (
    "relu",
    "relu6",
    "gelu",
    "silu",
    "swish",
    "elu",
    "celu",
    "selu",
    "softplus",
    "sigmoid",
    "log_sigmoid",
    "soft_sign",
    "hard_tanh",
    "leaky_relu",
    "tanh",
    "identity",
)


def _builtins() -> dict[str, Any]:
    """diffsim's own policy classes (every `eqx.Module` defined in `diffsim.policies` or its
    building blocks' module, including ones added later), `eqx.nn.Linear`, and common
    activations, by the name stored in JSON."""
    names: dict[str, Any] = {}
    for name, obj in vars(policies).items():
        if (
            inspect.isclass(obj)
            and issubclass(obj, eqx.Module)
            and obj.__module__ in (policies.__name__, _networks.__name__)
        ):
            names[f"diffsim.{name}"] = obj
    names["equinox.nn.Linear"] = eqx.nn.Linear
    names["diffsim.policies.tanh"] = policies.tanh
    names["jax.numpy.tanh"] = jnp.tanh
    for name in _ACTIVATIONS:
        if hasattr(jax.nn, name):
            names.setdefault(f"jax.nn.{name}", getattr(jax.nn, name))
    return names


_BUILTIN = _builtins()
_REGISTERED: dict[str, Any] = {}


def register_policy(obj, *, name: str | None = None):
    """Allow `load_run` to rebuild policies that contain `obj`, and return `obj`.

    `load_run` reads a policy's structure from JSON and only rebuilds classes and
    functions on an allow-list: diffsim's policies (`GaussianPolicy`,
    `DeterministicPolicy`, `ValueFunction`, `MLP`, `RunningNorm`, ...), `eqx.nn.Linear` and
    the activations in `jax.nn`. Register your own `eqx.Module` classes here, and any
    function a policy stores in a field (a custom activation). Registering says "I trust
    this code"; nothing named in a results folder is ever imported.

    **Arguments:**

    - `obj`: an `eqx.Module` subclass, or a function held in a policy's field.
    - `name`: the name stored in `policy.json`; default `module.qualname`. Give one for
      classes defined inside functions or lambdas, or to keep a name stable when code
      moves. Saving and loading must use the same name.

    **Returns:** `obj`, so it works as a class decorator.

    **Raises:** `TypeError` for anything else; `ValueError` for a name diffsim uses itself.

    **Example:**

    ```python
    @diffsim.register_policy
    class LinearPolicy(eqx.Module):
        weight: jax.Array

        def __call__(self, obs, *, key=None):
            return jnp.tanh(self.weight @ obs)

    run.save("results/linear")                  # policy.json names "__main__.LinearPolicy"
    run = diffsim.load_run("results/linear")    # rebuilt, since the class is registered
    ```
    """
    if inspect.isclass(obj):
        if not issubclass(obj, eqx.Module):
            raise TypeError(f"register_policy takes eqx.Module subclasses, got class {obj!r}")
    elif not callable(obj):
        raise TypeError(f"register_policy takes an eqx.Module class or a function, got {obj!r}")
    name = name or _default_name(obj)
    if name is None:
        raise ValueError(f"{obj!r} has no importable name: pass register_policy(..., name=...)")
    if name in _BUILTIN and _BUILTIN[name] is not obj:
        raise ValueError(f"{name!r} is one of diffsim's own names; pick another name=")
    _REGISTERED[name] = obj
    return obj


def allowed() -> dict[str, Any]:
    """Every name `load_run` may rebuild: diffsim's built-ins, then registered ones."""
    return {**_BUILTIN, **_REGISTERED}


def _default_name(obj) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}.{qualname}"


def _name_of(obj, where: str) -> str:
    for name, known in allowed().items():
        if known is obj:
            return name
    name = _default_name(obj)
    if name is None:
        raise TypeError(
            f"{where} holds {obj!r}, which has no name to store"
            " (a lambda or a local function or class): register it with"
            " diffsim.register_policy(obj, name=...)"
        )
    return name  # saving needs no registration; loading does


def encode(tree, where: str = "policy") -> Any:
    """The structure of `tree` (an `eqx.Module`) as a JSON-able node; arrays become shapes.

    Raises `TypeError` naming the first value that cannot be stored as data."""
    if isinstance(tree, eqx.Module):
        fields = {}
        for field in dataclasses.fields(tree):
            fields[field.name] = encode(getattr(tree, field.name), f"{where}.{field.name}")
        return {"module": _name_of(type(tree), where), "fields": fields}
    if eqx.is_array(tree):
        if jnp.issubdtype(tree.dtype, jax.dtypes.prng_key):
            raise TypeError(f"{where} is a PRNG key array, which a saved policy cannot hold")
        return {
            "array": [int(n) for n in tree.shape],
            "dtype": str(tree.dtype),
            "numpy": isinstance(tree, np.ndarray),
        }
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, (tuple, list)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [encode(x, f"{where}[{i}]") for i, x in enumerate(tree)]}
    if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
        return {"dict": {k: encode(v, f"{where}[{k!r}]") for k, v in tree.items()}}
    if callable(tree) and not inspect.isclass(tree):
        return {"function": _name_of(tree, where)}
    raise TypeError(f"{where} is a {type(tree).__name__}, which cannot be stored as data")


def decode(node, where: str = "policy") -> Any:
    """Rebuild the skeleton `encode` described: modules and static values as saved, arrays
    as `jax.ShapeDtypeStruct`s (NumPy arrays as
    broadcast views; nothing is allocated). Only allow-listed names are used.

    Raises `ValueError` naming the entry for anything unknown or malformed."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) == 0:
        raise ValueError(f"policy.json: unreadable entry at {where}: {_short(node)}")
    keys = set(node)
    if keys == {"module", "fields"} and isinstance(node["fields"], dict):
        cls = _lookup(node["module"], where, want_class=True)
        saved = node["fields"]
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(saved) != sorted(names):
            raise ValueError(
                f"policy.json: {where} was saved as {node['module']} with fields"
                f" {sorted(saved)}, but that class now has {sorted(names)}: the run was saved"
                " by another version of its code; load it with like=<a policy of the saved"
                " structure>"
            )
        module = object.__new__(cls)  # as tree_unflatten does: no __init__ runs
        for name in names:
            object.__setattr__(module, name, decode(saved[name], f"{where}.{name}"))
        return module
    if keys == {"array", "dtype", "numpy"}:
        shape, dtype = node["array"], node["dtype"]
        if not (
            isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise ValueError(f"policy.json: bad array shape at {where}: {_short(shape)}")
        try:
            dtype = jnp.dtype(dtype)
        except TypeError as error:
            raise ValueError(f"policy.json: bad dtype at {where}: {_short(dtype)}") from error
        if dtype.kind not in "biufc" and dtype != jnp.bfloat16:
            raise ValueError(f"policy.json: dtype {dtype} at {where} is not numeric")
        if node["numpy"]:  # a read-only broadcast view: nothing is allocated
            return np.broadcast_to(np.zeros((), dtype), tuple(shape))
        return jax.ShapeDtypeStruct(tuple(shape), dtype)
    if keys == {"tuple"} and isinstance(node["tuple"], list):
        return tuple(decode(x, f"{where}[{i}]") for i, x in enumerate(node["tuple"]))
    if keys == {"list"} and isinstance(node["list"], list):
        return [decode(x, f"{where}[{i}]") for i, x in enumerate(node["list"])]
    if keys == {"dict"} and isinstance(node["dict"], dict):
        return {k: decode(v, f"{where}[{k!r}]") for k, v in node["dict"].items()}
    if keys == {"function"}:
        return _lookup(node["function"], where, want_class=False)
    raise ValueError(f"policy.json: unreadable entry at {where}: {_short(node)}")


def _lookup(name, where: str, *, want_class: bool):
    table = allowed()
    if not isinstance(name, str) or name not in table:
        kind = "policy class" if want_class else "function"
        classes = sorted(n for n, v in table.items() if inspect.isclass(v) == want_class)
        raise ValueError(
            f"policy.json names {_short(name)} at {where}, which is not an allow-listed {kind};"
            f" allowed: {classes}. If this is your own code and you trust the folder, call"
            " diffsim.register_policy(<it>) before load_run"
        )
    obj = table[name]
    if inspect.isclass(obj) != want_class:
        raise ValueError(
            f"policy.json: {name!r} at {where} is not a {'class' if want_class else 'function'}"
        )
    return obj


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
