"""Reading Gateway API HTTPRoute (gateway.networking.k8s.io v1, v1beta1) into routes.

An HTTPRoute binds a waypoint's service through `parentRefs` of kind Service; each (rule,
match) becomes one route, ordered later by Gateway API precedence (`table`). Filters,
backend weights, timeouts and retries follow the Gateway API specification and istiod's
conversion (pilot/pkg/config/kube/gateway); durations are GEP-2257 durations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from ztagent.fields import Invalid, show
from ztagent.fields import at as _at
from ztagent.fields import gateway_duration as _gateway_duration
from ztagent.fields import integer as _int
from ztagent.fields import mapping as _map
from ztagent.fields import only as _only
from ztagent.fields import port as _port
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.fields import strings as _strings
from ztagent.istio.envelope import Resource
from ztagent.istio.resilience import DEFAULT_RETRY_POLICY, RetryPolicy
from ztagent.istio.routing.actions import (
    NO_HEADER_OPS,
    Destination,
    DirectResponse,
    Forward,
    HeaderOps,
    Mirror,
    PortMode,
    Redirect,
    Rewrite,
    RouteAction,
)
from ztagent.istio.routing.match import HeaderMatch, MatchKind, QueryMatch, RequestMatch, ValueMatch
from ztagent.istio.routing.reader import Reader
from ztagent.istio.routing.reader import header_name as _header_name
from ztagent.istio.routing.reader import header_value as _header_value
from ztagent.istio.routing.reader import regex as _regex
from ztagent.istio.routing.table import HTTPRouteRoutes, ParentRef, Route

MAX_HTTPROUTE_WEIGHT = 1_000_000
"""Gateway API's maximum backendRef weight (HTTPBackendRef `weight`, 0-1000000)."""

_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
}
_SUPPORTED_FILTERS = frozenset(
    {
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
        "RequestMirror",
    }
)
_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F", "#")


def _gw_path_value(value: str, path: str) -> None:
    if not value.startswith("/"):
        raise Invalid(path, f"{show(value)}: must be an absolute path")
    for part in _BAD_PATH_PARTS:
        if part in value:
            raise Invalid(path, f"{show(value)} must not contain {show(part)}")
    if value.endswith(("/..", "/.")):
        raise Invalid(path, f"{show(value)} must not end with /. or /..")


def _gw_match(value: object, path: str) -> RequestMatch:
    data = _map(value, path)
    _only(data, path, ("path", "headers", "queryParams", "method"))
    ppath = _at(path, "path")
    pdata = _map(data.get("path"), ppath)
    _only(pdata, ppath, ("type", "value"))
    kind = _str(pdata.get("type"), _at(ppath, "type"), "PathPrefix")
    text = _str(pdata.get("value"), _at(ppath, "value"), "/")
    vpath = _at(ppath, "value")
    if kind == "Exact":
        _gw_path_value(text, vpath)
        matcher = ValueMatch(MatchKind.EXACT, text)
    elif kind == "PathPrefix":
        _gw_path_value(text, vpath)
        matcher = ValueMatch(MatchKind.SEGMENT_PREFIX, text.rstrip("/"))
    elif kind == "RegularExpression":
        matcher = ValueMatch(MatchKind.REGEX, text, pattern=_regex(text, vpath))
    else:
        raise Invalid(
            _at(ppath, "type"), f"{show(kind)} is not Exact, PathPrefix or RegularExpression"
        )
    headers = [
        HeaderMatch(name, match)
        for name, match in _gw_named_matches(
            data.get("headers"), _at(path, "headers"), fold_case=True
        )
    ]
    query = [
        QueryMatch(name, match)
        for name, match in _gw_named_matches(
            data.get("queryParams"), _at(path, "queryParams"), fold_case=False
        )
    ]
    method = None
    if data.get("method") is not None:
        text = _str(data["method"], _at(path, "method"))
        if text not in _METHODS:
            raise Invalid(_at(path, "method"), f"{show(text)} is not one of {', '.join(_METHODS)}")
        method = ValueMatch(MatchKind.EXACT, text)
    return RequestMatch(matcher, method, None, None, tuple(headers), tuple(query))


def _gw_named_matches(items: object, path: str, *, fold_case: bool) -> list[tuple[str, ValueMatch]]:
    """HTTPHeaderMatch or HTTPQueryParamMatch entries as (name, match): the first entry of a
    name wins ("subsequent entries with an equivalent name MUST be ignored"); header names
    (`fold_case`) compare and are kept lower-case, query parameter names exactly."""
    out: list[tuple[str, ValueMatch]] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(items, path)):
        ipath = _at(path, i)
        data = _map(item, ipath)
        _only(data, ipath, ("type", "name", "value"))
        name = _header_name(data.get("name"), _at(ipath, "name"))
        match = _gw_value_match(data, ipath)
        key = name.lower() if fold_case else name
        if key not in seen:
            seen.add(key)
            out.append((key, match))
    return out


def _gw_value_match(data: Mapping[str, Any], path: str) -> ValueMatch:
    kind = _str(data.get("type"), _at(path, "type"), "Exact")
    if data.get("value") is None:
        raise Invalid(_at(path, "value"), "is required")
    value = _str(data.get("value"), _at(path, "value"))
    if kind == "Exact":
        return ValueMatch(MatchKind.EXACT, value)
    if kind == "RegularExpression":
        return ValueMatch(MatchKind.REGEX, value, pattern=_regex(value, _at(path, "value")))
    raise Invalid(_at(path, "type"), f"{show(kind)} is not Exact or RegularExpression")


def _gw_header_modifier(value: object, path: str) -> HeaderOps:
    data = _map(value, path)
    _only(data, path, ("set", "add", "remove"))
    lists: dict[str, list[tuple[str, str]]] = {}
    for verb in ("set", "add"):
        vpath = _at(path, verb)
        seen: set[str] = set()
        entries: list[tuple[str, str]] = []
        for i, item in enumerate(_list(data.get(verb), vpath)):
            ipath = _at(vpath, i)
            h = _map(item, ipath)
            _only(h, ipath, ("name", "value"))
            name = _header_name(h.get("name"), _at(ipath, "name"))
            text = _header_value(h.get("value"), _at(ipath, "value"))
            if name.lower() in seen:
                continue  # "Subsequent entries with an equivalent header name MUST be ignored"
            seen.add(name.lower())
            entries.append((name.lower(), text))
        lists[verb] = entries
    removes = []
    for i, name in enumerate(_strings(data.get("remove"), _at(path, "remove"))):
        removes.append(_header_name(name, _at(_at(path, "remove"), i)).lower())
    return HeaderOps(tuple(lists["set"]), tuple(lists["add"]), tuple(removes))


def _gw_path_modifier(value: object, path: str) -> tuple[str, str]:
    """(type, value) of an HTTPPathModifier."""
    data = _map(value, path)
    _only(data, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = _str(data.get("type"), _at(path, "type"))
    field_name = {"ReplaceFullPath": "replaceFullPath", "ReplacePrefixMatch": "replacePrefixMatch"}
    if kind not in field_name:
        raise Invalid(
            _at(path, "type"), f"{show(kind)} is not ReplaceFullPath or ReplacePrefixMatch"
        )
    other = "replacePrefixMatch" if kind == "ReplaceFullPath" else "replaceFullPath"
    if data.get(other) is not None:
        raise Invalid(_at(path, other), f"must not be set when type is {kind}")
    key = field_name[kind]
    if data.get(key) is None:
        raise Invalid(_at(path, key), f"is required when type is {kind}")
    text = _str(data[key], _at(path, key))
    if text and not text.startswith("/"):
        raise Invalid(_at(path, key), f"{show(text)}: must be an absolute path")
    if kind == "ReplaceFullPath" and not text:
        raise Invalid(_at(path, key), "must not be empty")
    return kind, text


def _backend(
    reader: Reader, data: Mapping[str, Any], path: str, known: Iterable[str]
) -> Destination:
    _only(data, path, known)
    group = _str(data.get("group"), _at(path, "group"))
    kind = _str(data.get("kind"), _at(path, "kind"), "Service")
    name = _str(data.get("name"), _at(path, "name"))
    if not name:
        raise Invalid(_at(path, "name"), "is required")
    namespace = _str(data.get("namespace"), _at(path, "namespace")) or reader.namespace
    port = (
        None
        if data.get("port") is None
        else _port(data["port"], _at(path, "port"), digit_strings=False)
    )
    if group in ("", "core") and kind == "Service":
        if port is None:
            raise Invalid(_at(path, "port"), "is required for a Service backend")
        host = reader.service(name, namespace)
    elif group == "networking.istio.io" and kind == "Hostname":
        host = name
    else:
        raise Invalid(
            _at(path, "kind"),
            f"{show((group + '/' if group else '') + kind)} is not a supported backend "
            "(Service, or networking.istio.io Hostname)",
        )
    return Destination(host, port)


def _gw_filters(
    reader: Reader, items: list[Any], path: str, matches: list[RequestMatch], backends: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"mirrors": []}
    seen: set[str] = set()
    for i, item in enumerate(items):
        ipath = _at(path, i)
        data = _map(item, ipath)
        _only(data, ipath, ("type", *_FILTER_FIELDS.values()))
        kind = _str(data.get("type"), _at(ipath, "type"))
        if kind not in _FILTER_FIELDS:
            raise Invalid(_at(ipath, "type"), f"{show(kind)} is not a filter type")
        key = _FILTER_FIELDS[kind]
        for other in _FILTER_FIELDS.values():
            if other != key and data.get(other) is not None:
                raise Invalid(_at(ipath, other), f"must not be set for a {kind} filter")
        if kind not in _SUPPORTED_FILTERS:
            raise Invalid(_at(ipath, "type"), f"{kind} filters are not supported by the waypoint")
        if kind != "RequestMirror" and kind in seen:
            raise Invalid(_at(ipath, "type"), f"{kind} may appear only once per rule")
        seen.add(kind)
        if data.get(key) is None:
            raise Invalid(_at(ipath, key), f"is required for a {kind} filter")
        cpath = _at(ipath, key)
        config = _map(data[key], cpath)
        if kind == "RequestHeaderModifier":
            out["request_headers"] = _gw_header_modifier(config, cpath)
        elif kind == "ResponseHeaderModifier":
            out["response_headers"] = _gw_header_modifier(config, cpath)
        elif kind == "RequestMirror":
            out["mirrors"].append(_gw_mirror(reader, config, cpath))
        elif kind == "URLRewrite":
            out["rewrite"] = _gw_rewrite(config, cpath, matches)
        else:
            out["redirect"] = _gw_redirect(config, cpath, matches)
    if "redirect" in out and "rewrite" in out:
        raise Invalid(path, "RequestRedirect and URLRewrite cannot be used on the same rule")
    if "redirect" in out and backends:
        reader.note(path, "a rule with RequestRedirect answers the redirect; backendRefs unused")
    return out


def _requires_prefix_matches(matches: list[RequestMatch], path: str) -> None:
    for m in matches:
        if m.path is None or m.path.kind is not MatchKind.SEGMENT_PREFIX:
            raise Invalid(path, "ReplacePrefixMatch requires PathPrefix matches only")


def _gw_new_path(
    data: Mapping[str, Any], path: str, matches: list[RequestMatch]
) -> tuple[str | None, str | None]:
    """The `path` of a URLRewrite or RequestRedirect filter as (full path, prefix): at most
    one is set; ReplacePrefixMatch needs every match of the rule to be a PathPrefix."""
    if data.get("path") is None:
        return None, None
    kind, text = _gw_path_modifier(data["path"], _at(path, "path"))
    if kind == "ReplaceFullPath":
        return text, None
    _requires_prefix_matches(matches, _at(path, "path"))
    return None, text


def _gw_rewrite(data: Mapping[str, Any], path: str, matches: list[RequestMatch]) -> Rewrite:
    _only(data, path, ("hostname", "path"))
    hostname = _str(data.get("hostname"), _at(path, "hostname")) or None
    full, prefix = _gw_new_path(data, path, matches)
    return Rewrite(segment_prefix=prefix, full_path=full, authority=hostname)


def _gw_redirect(data: Mapping[str, Any], path: str, matches: list[RequestMatch]) -> Redirect:
    _only(data, path, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = _str(data.get("scheme"), _at(path, "scheme")) or None
    if scheme not in (None, "http", "https"):
        raise Invalid(_at(path, "scheme"), 'must be "http" or "https"')
    hostname = _str(data.get("hostname"), _at(path, "hostname")) or None
    port = (
        None
        if data.get("port") is None
        else _port(data["port"], _at(path, "port"), digit_strings=False)
    )
    status = 302
    if data.get("statusCode") is not None:
        status = _int(data["statusCode"], _at(path, "statusCode"), 300, 399)
        if status not in (301, 302, 303, 307, 308):
            raise Invalid(_at(path, "statusCode"), f"{status} is not 301, 302, 303, 307 or 308")
    full, prefix = _gw_new_path(data, path, matches)
    mode = PortMode.PROTOCOL_DEFAULT if scheme is not None else PortMode.REQUEST
    return Redirect(status, scheme, hostname, port, mode, full, prefix, segments=True)


def _gw_mirror(reader: Reader, data: Mapping[str, Any], path: str) -> Mirror:
    _only(data, path, ("backendRef", "percent", "fraction"))
    if data.get("backendRef") is None:
        raise Invalid(_at(path, "backendRef"), "is required")
    bpath = _at(path, "backendRef")
    dest = _backend(
        reader,
        _map(data["backendRef"], bpath),
        bpath,
        ("group", "kind", "name", "namespace", "port"),
    )
    if data.get("percent") is not None and data.get("fraction") is not None:
        raise Invalid(path, "only one of percent and fraction may be set")
    percent = 100.0
    if data.get("percent") is not None:
        percent = float(_int(data["percent"], _at(path, "percent"), 0, 100))
    elif data.get("fraction") is not None:
        fpath = _at(path, "fraction")
        f = _map(data["fraction"], fpath)
        _only(f, fpath, ("numerator", "denominator"))
        if f.get("numerator") is None:
            raise Invalid(_at(fpath, "numerator"), "is required")
        numerator = _int(f["numerator"], _at(fpath, "numerator"), 0, 2**31 - 1)
        denominator = _int(f.get("denominator", 100), _at(fpath, "denominator"), 1, 2**31 - 1)
        if numerator > denominator:
            raise Invalid(fpath, "numerator must not be greater than denominator")
        percent = 100.0 * numerator / denominator
    return Mirror(dest, percent)


def _gw_retry(value: object, path: str) -> RetryPolicy | None:
    data = _map(value, path)
    _only(data, path, ("attempts", "backoff", "codes"))
    attempts = (
        2
        if data.get("attempts") is None
        else _int(data["attempts"], _at(path, "attempts"), 0, 2**31 - 1)
    )
    codes: list[int] = []
    for i, code in enumerate(_list(data.get("codes"), _at(path, "codes"))):
        codes.append(_int(code, _at(_at(path, "codes"), i), 400, 599))
    backoff = None
    if data.get("backoff") is not None:
        backoff = _gateway_duration(data["backoff"], _at(path, "backoff"))
        if backoff <= 0:
            raise Invalid(_at(path, "backoff"), "must be greater than 0")
    if attempts == 0:
        return None
    retry_on = {"connect-failure", "refused-stream", "unavailable", "cancelled"}
    if codes:
        retry_on.add("retriable-status-codes")
    return RetryPolicy(
        attempts,
        frozenset(retry_on),
        frozenset(codes),
        backoff_base=backoff if backoff is not None else DEFAULT_RETRY_POLICY.backoff_base,
    )


def _gw_rule(reader: Reader, value: object, path: str, index: int) -> list[Route]:
    data = _map(value, path)
    _only(
        data,
        path,
        ("name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"),
    )
    rule_name = _str(data.get("name"), _at(path, "name"))
    if data.get("sessionPersistence") is not None:
        reader.note(_at(path, "sessionPersistence"), "session persistence is not applied")
    mpath = _at(path, "matches")
    matches = [
        _gw_match(item, _at(mpath, i)) for i, item in enumerate(_list(data.get("matches"), mpath))
    ]
    if not matches:
        matches = [RequestMatch(ValueMatch(MatchKind.SEGMENT_PREFIX, ""))]
    bpath = _at(path, "backendRefs")
    backends = _list(data.get("backendRefs"), bpath)
    filters = _gw_filters(
        reader,
        _list(data.get("filters"), _at(path, "filters")),
        _at(path, "filters"),
        matches,
        bool(backends),
    )
    dests: list[Destination] = []
    for i, item in enumerate(backends):
        ipath = _at(bpath, i)
        b = _map(item, ipath)
        dest = _backend(
            reader, b, ipath, ("group", "kind", "name", "namespace", "port", "weight", "filters")
        )
        weight = (
            1
            if b.get("weight") is None
            else _int(b["weight"], _at(ipath, "weight"), 0, MAX_HTTPROUTE_WEIGHT)
        )
        fpath = _at(ipath, "filters")
        req = resp = NO_HEADER_OPS
        seen: set[str] = set()
        for j, f in enumerate(_list(b.get("filters"), fpath)):
            jpath = _at(fpath, j)
            fd = _map(f, jpath)
            _only(fd, jpath, ("type", *_FILTER_FIELDS.values()))
            kind = _str(fd.get("type"), _at(jpath, "type"))
            if kind not in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                raise Invalid(_at(jpath, "type"), f"{show(kind)} is not supported on a backendRef")
            if kind in seen:
                raise Invalid(_at(jpath, "type"), f"{kind} may appear only once per backendRef")
            seen.add(kind)
            key = _FILTER_FIELDS[kind]
            ops = _gw_header_modifier(fd.get(key), _at(jpath, key))
            if kind == "RequestHeaderModifier":
                req = ops
            else:
                resp = ops
        if weight > 0:
            dests.append(Destination(dest.host, dest.port, "", weight, req, resp))
    action: RouteAction
    if "redirect" in filters:
        action = filters["redirect"]
    elif not dests:
        action = DirectResponse(500)
    else:
        action = Forward(tuple(dests))

    timeout: float | None = None
    backend_timeout: float | None = None
    if data.get("timeouts") is not None:
        tpath = _at(path, "timeouts")
        t = _map(data["timeouts"], tpath)
        _only(t, tpath, ("request", "backendRequest"))
        if t.get("request") is not None:
            timeout = _gateway_duration(t["request"], _at(tpath, "request")) or None
        if t.get("backendRequest") is not None:
            backend_timeout = (
                _gateway_duration(t["backendRequest"], _at(tpath, "backendRequest")) or None
            )
        if timeout is not None and backend_timeout is not None and backend_timeout > timeout:
            raise Invalid(
                _at(tpath, "backendRequest"),
                "backendRequest timeout cannot be longer than request timeout",
            )
    retry: RetryPolicy | None = DEFAULT_RETRY_POLICY
    if data.get("retry") is not None:
        retry = _gw_retry(data["retry"], _at(path, "retry"))
        if retry is not None and backend_timeout is not None:
            retry = replace(retry, per_try_timeout=backend_timeout)
    elif backend_timeout is not None:
        timeout = backend_timeout
    forwards = isinstance(action, Forward)
    return [
        Route(
            reader.source(index, j, rule_name),
            action,
            (match,),
            filters.get("request_headers", NO_HEADER_OPS),
            filters.get("response_headers", NO_HEADER_OPS),
            filters.get("rewrite"),
            timeout if forwards else None,
            retry if forwards else None,
            None,
            tuple(filters["mirrors"]) if forwards else (),
        )
        for j, match in enumerate(matches)
    ]


def read_http_route(reader: Reader, resource: Resource) -> HTTPRouteRoutes | None:
    spec = _map(resource.body.get("spec"), "spec")
    _only(spec, "spec", ("parentRefs", "hostnames", "rules", "useDefaultGateways"))
    _strings(spec.get("hostnames"), "spec.hostnames")
    parents: list[ParentRef] = []
    for i, item in enumerate(_list(spec.get("parentRefs"), "spec.parentRefs")):
        ppath = _at("spec.parentRefs", i)
        p = _map(item, ppath)
        _only(p, ppath, ("group", "kind", "namespace", "name", "sectionName", "port"))
        group = _str(p.get("group"), _at(ppath, "group"), "gateway.networking.k8s.io")
        kind = _str(p.get("kind"), _at(ppath, "kind"), "Gateway")
        name = _str(p.get("name"), _at(ppath, "name"))
        if not name:
            raise Invalid(_at(ppath, "name"), "is required")
        if group not in ("", "core") or kind != "Service":
            continue
        if p.get("sectionName") is not None:
            raise Invalid(
                _at(ppath, "sectionName"), "is not supported for Service parents (use port)"
            )
        namespace = _str(p.get("namespace"), _at(ppath, "namespace")) or reader.namespace
        port = (
            None
            if p.get("port") is None
            else _port(p["port"], _at(ppath, "port"), digit_strings=False)
        )
        parents.append(ParentRef(namespace, name, port))
    routes: list[Route] = []
    for i, item in enumerate(_list(spec.get("rules"), "spec.rules")):
        routes.extend(_gw_rule(reader, item, _at("spec.rules", i), i))
    if not parents:
        reader.note("spec.parentRefs", "no Service parent: not a waypoint route")
        return None
    return HTTPRouteRoutes(
        reader.namespace, reader.name, reader.created, tuple(parents), tuple(routes)
    )
