"""The checkpoint file: one safetensors file with a model's whole state and config.

Tensors: ``<name>`` is a parameter's value and ``<name>@<buffer>`` each of its rule's state
buffers (``w@velocity``), float32 or float64, as in the safetensors wire format (``@`` never
occurs in a parameter name). ``__metadata__`` (string to string):

- ``format``: ``momentum-checkpoint/1``;
- ``model``: the model's name when saved (informational: a checkpoint restores under any name);
- ``config``: the model's config, JSON text, as ``GET /v1/models/{model}`` shows it (rule,
  hyperparameters, groups, schedule, mode, durability);
- ``params``: JSON text ``{name: {"step": n, "state": [buffer names]}}``.

Reading checks everything before anything is restored: the safetensors framing (as for any
body), the metadata, the config (as ``PUT /v1/models`` does), that the tensors are exactly the
values and buffers that ``params`` lists, that every buffer is one of its rule's and has its
value's shape and dtype, and that every number is finite. A file that fails a check is a 422
naming what is wrong, and nothing changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson

from ...config import ModelConfig
from ...engine.checkpoints import Checkpoint, Saved
from ...errors import InvalidConfig
from . import BodyError, Encoded, Limits
from .checks import check_finite, check_name
from .safetensors import STATE_DTYPES, encode, read_raw

__all__ = ["FORMAT", "decode", "encode_checkpoint"]

FORMAT = "momentum-checkpoint/1"
MAX_TENSORS = 1 << 20


def encode_checkpoint(model: str, saved: Saved) -> Encoded:
    """The checkpoint as parts: the header, then each array's own buffer (nothing copied)."""
    tensors = {}
    params: dict[str, Any] = {}
    for name, p in sorted(saved.params.items()):
        tensors[name] = p.value
        for buffer, a in sorted(p.state.items()):
            tensors[f"{name}@{buffer}"] = a
        params[name] = {"step": p.step, "state": sorted(p.state)}
    metadata = {"config": saved.config.to_dict(), "params": params}
    return encode(tensors, {**metadata, "format": FORMAT, "model": model})


def _bad(detail: str, *loc: Any) -> BodyError:
    return BodyError(
        422, "invalid-checkpoint", detail, errors=[{"loc": ["body", "__metadata__", *loc], "msg": detail[:300]}]
    )


def _json(metadata: Mapping[str, str], key: str) -> Any:
    if key not in metadata:
        raise _bad(f"the checkpoint has no {key!r} in its metadata (is it a momentum-service checkpoint?)", key)
    try:
        return orjson.loads(metadata[key])
    except orjson.JSONDecodeError:
        raise _bad(f"metadata {key!r} must be JSON text", key) from None


def decode(body: memoryview, limits: Limits) -> Checkpoint:
    """A checkpoint file, checked whole (see the module docstring); :class:`BodyError` otherwise."""
    # A checkpoint holds every parameter of a model (which may have been set over many requests): the
    # count is bounded by the header's size limit instead of the per-request parameter limit.
    tensors, metadata, raw = read_raw(body, dataclasses.replace(limits, max_params=MAX_TENSORS), allowed=STATE_DTYPES)
    for key, a in tensors.items():
        name, _, buffer = key.partition("@")
        check_name(name, [key])
        if "@" in buffer:
            raise _bad(f"tensor {key!r}: a name holds at most one @ (<parameter>@<buffer>)", "params")
        check_finite(a, [key])
    fmt = _json(metadata, "format")
    if fmt != FORMAT:
        raise _bad(f"metadata format must be {FORMAT!r}, got {fmt!r}", "format")
    config_json = _json(metadata, "config")
    if not isinstance(config_json, dict) or "optimizer" not in config_json:
        raise _bad("metadata config must be a model config object with an optimizer", "config")
    try:
        config = ModelConfig.from_dict(config_json)
    except InvalidConfig as exc:
        raise BodyError(
            422,
            "invalid-checkpoint",
            f"the checkpoint's config is not valid: {exc}",
            errors=[{"loc": ["body", "__metadata__", "config", exc.field, *exc.path], "msg": str(exc)[:300]}],
        ) from None
    except (TypeError, ValueError, KeyError) as exc:
        raise _bad(f"the checkpoint's config is not valid: {exc}", "config") from None
    listed = _json(metadata, "params")
    if not isinstance(listed, dict):
        raise _bad('metadata params must be an object {name: {"step": n, "state": [buffers]}}', "params")
    params: dict[str, tuple[int, tuple[str, ...]]] = {}
    expected: set[str] = set()
    for name, info in listed.items():
        if not isinstance(info, dict) or set(info) - {"step", "state"}:
            raise _bad(f'params[{name!r}] must be {{"step": n, "state": [buffer names]}}', "params", name)
        step, buffers = info.get("step"), info.get("state", [])
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
            raise _bad(f"params[{name!r}].step must be an integer from 0 to 2**63-1, got {step!r}", "params", name)
        if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
            raise _bad(f"params[{name!r}].state must be a list of buffer names", "params", name)
        if name not in tensors:
            raise _bad(f"the checkpoint lists parameter {name!r} but has no tensor {name!r}", "params", name)
        rule = config.rule_for(name)
        value = tensors[name]
        for b in buffers:
            if b not in rule.buffers:
                raise _bad(
                    f"parameter {name!r}: rule {rule.name!r} has no state buffer {b!r} (its buffers: "
                    f"{', '.join(rule.buffers)})",
                    "params",
                    name,
                )
            key = f"{name}@{b}"
            if key not in tensors:
                raise _bad(f"parameter {name!r}: its buffer {b!r} is listed but tensor {key!r} is missing", "params")
            a = tensors[key]
            if a.shape != value.shape or a.dtype != value.dtype:
                raise _bad(
                    f"tensor {key!r} is {a.dtype.name} {list(a.shape)}; its parameter is {value.dtype.name} "
                    f"{list(value.shape)}",
                    "params",
                    name,
                )
            expected.add(key)
        if len(set(buffers)) != len(buffers):
            raise _bad(f"parameter {name!r}: a buffer is listed twice", "params", name)
        expected.add(name)
        params[name] = (step, tuple(buffers))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise _bad(
            f"tensor(s) {', '.join(map(repr, extra[:10]))} are not listed in the metadata's params "
            "(a checkpoint holds exactly its parameters' values and their listed buffers)",
            "params",
        )
    return Checkpoint(config, raw, params)
