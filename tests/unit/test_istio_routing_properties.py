"""Properties of routing: path matches and prefix rewrites, and parsing arbitrary input never
raises."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.routing_helpers import REVIEWS, doc, hr, load, req
from ztagent.istio.routing import Request
from ztagent.istio.routing.actions import replace_segment_prefix
from ztagent.istio.routing.match import MatchKind, RequestMatch, ValueMatch

# --- properties --------------------------------------------------------------------------------

segment = st.text(alphabet="abcXYZ019-_.~", min_size=1, max_size=6)
paths = st.lists(segment, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))


@given(paths, paths)
def test_exact_path_never_matches_another_path(route_path, request_path):
    match = RequestMatch(path=ValueMatch(MatchKind.EXACT, route_path))
    assert match.matches(Request("GET", request_path + "?q=1")) is (request_path == route_path)


@given(paths, paths)
def test_segment_prefix_semantics(prefix, path):
    value = prefix.rstrip("/")
    match = RequestMatch(path=ValueMatch(MatchKind.SEGMENT_PREFIX, value))
    expected = path == value or path.startswith(value + "/")
    assert match.matches(Request("GET", path)) is expected
    if expected:
        rewritten = replace_segment_prefix(path, prefix, "/new")
        assert rewritten.startswith("/new")
        assert rewritten[len("/new") :] == path[len(value) :]


@given(paths, paths)
def test_string_prefix_semantics(prefix, path):
    match = RequestMatch(path=ValueMatch(MatchKind.PREFIX, prefix))
    assert match.matches(Request("GET", path + "#frag")) is path.startswith(prefix)


@given(paths, st.text(alphabet="/abc", max_size=8))
def test_replace_segment_prefix_always_absolute(path, replacement):
    assert replace_segment_prefix(path, "/", replacement).startswith("/")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "uri",
                    "exact",
                    "prefix",
                    "regex",
                    "route",
                    "destination",
                    "host",
                    "weight",
                    "match",
                    "headers",
                    "x",
                    "redirect",
                    "uri",
                    "timeout",
                    "port",
                    "number",
                    "percentage",
                    "value",
                ]
            ),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@given(json_values)
def test_parse_never_raises_on_arbitrary_virtual_service(http):
    text = doc("VirtualService", {"hosts": ["reviews"], "http": [http]})
    config = load(text)
    if not config.errors:
        config.table(REVIEWS, 9080).select(req())


@given(json_values)
def test_parse_never_raises_on_arbitrary_http_route(rule):
    config = load(hr([rule]))
    if not config.errors:
        config.table(REVIEWS, 9080).select(req())
