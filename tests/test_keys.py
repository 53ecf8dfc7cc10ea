"""Every Redis key names exactly one thing, and one model's keys share one Redis Cluster slot."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from momentum_service.api.schemas import MODEL_NAME_PATTERN
from momentum_service.store.keys import Keys

# Model names (the API's pattern), biased towards what looks like key parts.
_PART = st.sampled_from(
    ["m", "i", "wait", "log", "snap", "stage", "idem", "-exp", "meta", "points", "1", ".", "_", "-", "model"]
)
MODELS = st.lists(_PART, min_size=1, max_size=5).map("".join).filter(lambda s: re.fullmatch(MODEL_NAME_PATTERN, s))
INCS = st.sampled_from(["0a1b", "ffee", "1"])
NUMS = st.integers(0, 30)

KEY = st.one_of(
    st.tuples(st.just("model"), MODELS),
    st.tuples(st.just("lease"), MODELS),
    st.tuples(st.just("wait"), MODELS),
    st.tuples(st.just("log"), MODELS, INCS, NUMS, NUMS),
    st.tuples(st.just("logmeta"), MODELS, INCS),
    st.tuples(st.just("stage"), MODELS, INCS, NUMS, NUMS, NUMS),
    st.tuples(st.just("snap"), MODELS, INCS, NUMS, NUMS, NUMS),
    st.tuples(st.just("idem"), MODELS, INCS),
    st.tuples(st.just("idem-exp"), MODELS, INCS),
    st.tuples(st.just("points"), MODELS, INCS),
    st.tuples(st.just("replicas")),
    st.tuples(st.just("index")),
    st.tuples(st.just("replica-urls")),
)


def build(spec: tuple[object, ...]) -> str:
    keys = Keys("momentum")
    kind, *args = spec
    return {  # type: ignore[no-any-return]
        "model": keys.model,
        "lease": keys.lease,
        "wait": keys.wait,
        "log": keys.log,
        "logmeta": keys.logmeta,
        "stage": keys.stage,
        "snap": keys.snap,
        "idem": keys.idempotency,
        "idem-exp": keys.idempotency_expiry,
        "points": keys.points,
        "replicas": keys.replicas,
        "index": keys.index,
        "replica-urls": keys.replica_urls,
    }[str(kind)](*args)


@given(KEY, KEY)
def test_distinct_things_have_distinct_keys(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    assert (build(a) == build(b)) == (a == b)


@given(KEY)
def test_a_models_keys_share_its_hash_tag(spec: tuple[object, ...]) -> None:
    key = build(spec)
    tag = re.search(r"\{([^}]*)\}", key)
    assert tag is not None
    expected = {"replicas": "replicas", "replica-urls": "replicas", "index": "models"}.get(str(spec[0]))
    expected = expected or spec[1]
    assert tag.group(1) == expected
