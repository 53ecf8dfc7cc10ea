"""Every Redis key and sync field names exactly one thing, whatever the parameter names."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from momentum_service.store import keys as k
from momentum_service.store.keys import Keys

# Parameter names (the API's pattern), biased towards what looks like key parts.
_PART = st.sampled_from(["w", ":", "who", "grads", "g", "n", "p", "1", "sync", "idem", "-exp", "params", ".", "_"])
NAMES = st.lists(_PART, min_size=1, max_size=6).map("".join).filter(lambda s: s[0] not in ":.-")
MODELS = st.sampled_from(["m", "m:1", "a.b", "x-y"])
INCS = st.sampled_from(["0a1b", "ffee"])
STEPS = st.integers(0, 20)

KEY = st.one_of(
    st.tuples(st.just("model"), MODELS),
    st.tuples(st.just("index"), MODELS, INCS),
    st.tuples(st.just("param"), MODELS, INCS, NAMES),
    st.tuples(st.just("idem"), MODELS, INCS),
    st.tuples(st.just("idem-exp"), MODELS, INCS),
    st.tuples(st.just("sync"), MODELS, INCS, STEPS),
    st.tuples(st.just("sync-exp"), MODELS, INCS),
)


def build(spec: tuple[object, ...]) -> str:
    keys = Keys("momentum")
    kind, *args = spec
    return {
        "model": keys.model,
        "index": keys.param_index,
        "param": keys.param,
        "idem": keys.idempotency,
        "idem-exp": keys.idempotency_expiry,
        "sync": keys.sync_step,
        "sync-exp": keys.sync_expiry,
    }[str(kind)](*args)


@given(KEY, KEY)
def test_distinct_things_have_distinct_keys(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    assert (build(a) == build(b)) == (a == b)


FIELD = st.one_of(
    st.tuples(st.just("g"), st.integers(0, 30), NAMES),
    st.tuples(st.just("w"), st.integers(0, 30), NAMES),
    st.tuples(st.just("n"), st.just(0), NAMES),
)


def field(spec: tuple[str, int, str]) -> str:
    kind, worker, name = spec
    if kind == "g":
        return k.sync_grad_field(worker, name)
    if kind == "w":
        return k.sync_who_field(worker, name)
    return k.sync_count_field(name)


@given(FIELD, FIELD)
def test_distinct_sync_fields_are_distinct(a: tuple[str, int, str], b: tuple[str, int, str]) -> None:
    assert (field(a) == field(b)) == (a == b)


@given(st.sampled_from(["g", "w"]), st.integers(0, 1023), NAMES)
def test_sync_fields_parse_back(kind: str, worker: int, name: str) -> None:
    assert k.parse_sync_field(field((kind, worker, name))) == (kind, worker, name)


def test_the_collision_found_in_testing_is_gone() -> None:
    """Before: ``sync_workers(step, "w")`` was ``sync_grads(step, "w:who")``."""
    assert k.sync_who_field(0, "w") != k.sync_grad_field(0, "w:who")
    assert k.sync_who_field(0, "w:who") != k.sync_grad_field(0, "w")
