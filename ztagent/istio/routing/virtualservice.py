"""Reading Istio's VirtualService (networking.istio.io v1, v1beta1, v1alpha3) into routes.

Follows istiod's validation (pkg/config/validation, ValidateHTTPRoute and friends) for what is
an error, and its waypoint translation for what applies in ambient mode: a match with
`sourceLabels`, with `gateways` not including `mesh`, with a `sourceNamespace` other than the
waypoint's, or on a JWT claim is dropped with a note; `tcp` and `tls` routes, `corsPolicy`
are noted. Durations are Go durations of at least 1ms and whole milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ztagent.fields import Invalid, show
from ztagent.fields import at as _at
from ztagent.fields import boolean as _bool
from ztagent.fields import duration as _duration
from ztagent.fields import integer as _int
from ztagent.fields import mapping as _map
from ztagent.fields import number as _number
from ztagent.fields import only as _only
from ztagent.fields import port as _port
from ztagent.fields import sequence as _list
from ztagent.fields import string as _str
from ztagent.fields import strings as _strings
from ztagent.istio.envelope import Resource
from ztagent.istio.resilience import (
    DEFAULT_RETRY_POLICY,
    FaultPolicy,
    GrpcStatus,
    RetryPolicy,
    retry_policy,
)
from ztagent.istio.routing.actions import (
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
from ztagent.istio.routing.match import (
    MATCH_ALL,
    HeaderMatch,
    MatchKind,
    QueryMatch,
    RequestMatch,
    ValueMatch,
)
from ztagent.istio.routing.re2 import re2_substitution
from ztagent.istio.routing.reader import Reader
from ztagent.istio.routing.reader import header_name as _header_name
from ztagent.istio.routing.reader import header_value as _header_value
from ztagent.istio.routing.reader import regex as _regex
from ztagent.istio.routing.table import Route, VirtualServiceRoutes

MESH_GATEWAY = "mesh"
MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024
"""istiod refuses a larger directResponse body (validation: "must be smaller than 1MB")."""
_PSEUDO_HEADERS = (":method", ":scheme", ":authority", ":path", ":status")


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


def _editable(name: str, path: str) -> None:
    """Istio's rule for header edits: no pseudo-headers, no Host (use the authority)."""
    if name.lower() == "host":
        raise Invalid(path, "cannot edit the Host header (set the authority instead)")
    if name.startswith(":"):
        raise Invalid(path, f'{show(name)}: header cannot have ":" prefix')
    _header_name(name, path)


_STRING_MATCH_KEYS = ("exact", "prefix", "regex")


def _vs_string_match(
    value: object, path: str, *, allow_empty_prefix: bool = False, ignore_case: bool = False
) -> ValueMatch | None:
    """An Istio ValueMatch; `{}` (or regex "*") is a presence match, returned as PRESENT."""
    data = _map(value, path)
    _only(data, path, _STRING_MATCH_KEYS)
    given = [k for k in _STRING_MATCH_KEYS if k in data]
    if len(given) > 1:
        raise Invalid(path, f"only one of exact, prefix, regex may be set (got {', '.join(given)})")
    if not given:
        return ValueMatch(MatchKind.PRESENT)
    key = given[0]
    text = _str(data[key], _at(path, key))
    if key == "exact":
        return ValueMatch(MatchKind.EXACT, text, ignore_case)
    if key == "prefix":
        if not text and not allow_empty_prefix:
            raise Invalid(_at(path, key), "prefix string match should not be empty")
        return ValueMatch(MatchKind.PREFIX, text, ignore_case)
    if text == "*":
        return ValueMatch(MatchKind.PRESENT)
    if not text:
        raise Invalid(_at(path, key), "regex string match should not be empty")
    return ValueMatch(MatchKind.REGEX, text, pattern=_regex(text, _at(path, key)))


def _request_attr(value: object, path: str) -> ValueMatch | None:
    """uri/scheme/method/authority: an empty ValueMatch constrains nothing."""
    if value is None:
        return None
    match = _vs_string_match(value, path)
    return None if match is None or match.kind is MatchKind.PRESENT else match


_JWT_CLAIM_PREFIX = "@request.auth.claims"


def _vs_match(reader: Reader, value: object, path: str) -> RequestMatch | None:
    """One HTTPMatchRequest, or None when it can never apply in a waypoint (with a note)."""
    data = _map(value, path)
    _only(
        data,
        path,
        [
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "withoutHeaders",
            "queryParams",
            "port",
            "ignoreUriCase",
            "sourceLabels",
            "sourceNamespace",
            "gateways",
            "statPrefix",
        ],
    )
    _str(data.get("name"), _at(path, "name"))
    _str(data.get("statPrefix"), _at(path, "statPrefix"))
    ignore_case = _bool(data.get("ignoreUriCase"), _at(path, "ignoreUriCase"))
    uri: ValueMatch | None = None
    if data.get("uri") is not None:
        uri = _vs_string_match(
            data["uri"], _at(path, "uri"), allow_empty_prefix=True, ignore_case=ignore_case
        )
        if uri is not None and uri.kind is MatchKind.PRESENT:
            uri = None
    scheme = _request_attr(data.get("scheme"), _at(path, "scheme"))
    method = _request_attr(data.get("method"), _at(path, "method"))
    authority = _request_attr(data.get("authority"), _at(path, "authority"))
    headers: list[HeaderMatch] = []
    drop: str | None = None
    for key, invert in (("headers", False), ("withoutHeaders", True)):
        hpath = _at(path, key)
        for name, item in sorted(_map(data.get(key), hpath).items()):
            ipath = _at(hpath, name)
            if item is None and not invert:
                raise Invalid(ipath, "header match cannot be null")
            if name.startswith(_JWT_CLAIM_PREFIX):
                _vs_string_match(item, ipath)
                drop = f"{ipath}: JWT claim routing is not supported; the match is dropped"
                continue
            if name.startswith(":") and name not in _PSEUDO_HEADERS:
                raise Invalid(ipath, f"{show(name)} is not a pseudo-header")
            _header_name(name, ipath, pseudo=True)
            matcher = _vs_string_match(item, ipath)
            assert matcher is not None
            headers.append(HeaderMatch(name, matcher, invert))
    query: list[QueryMatch] = []
    qpath = _at(path, "queryParams")
    for name, item in sorted(_map(data.get("queryParams"), qpath).items()):
        if item is None:
            raise Invalid(_at(qpath, name), "query param match cannot be null")
        matcher = _vs_string_match(item, _at(qpath, name))
        assert matcher is not None
        query.append(QueryMatch(name, matcher))
    port = None
    if data.get("port") not in (None, 0):
        port = _port(data["port"], _at(path, "port"), digit_strings=False)
    gateways = _strings(data.get("gateways"), _at(path, "gateways"))
    labels = _map(data.get("sourceLabels"), _at(path, "sourceLabels"))
    source_ns = _str(data.get("sourceNamespace"), _at(path, "sourceNamespace"))
    if gateways and MESH_GATEWAY not in gateways:
        drop = f"{_at(path, 'gateways')}: does not include mesh; the match is dropped"
    elif labels:
        drop = f"{_at(path, 'sourceLabels')}: ambient has no source labels; the match is dropped"
    elif source_ns and source_ns != reader.options.waypoint_namespace:
        drop = (
            f"{_at(path, 'sourceNamespace')}: compared with the waypoint's namespace "
            f"({reader.options.waypoint_namespace or 'unknown'}); the match is dropped"
        )
    if drop is not None:
        where, _, reason = drop.partition(": ")
        reader.note(where, reason)
        return None
    return RequestMatch(uri, method, scheme, authority, tuple(headers), tuple(query), port)


def _destination(reader: Reader, value: object, path: str) -> Destination:
    data = _map(value, path)
    if value is None:
        raise Invalid(path, "is required")
    _only(data, path, ("host", "subset", "port"))
    host = _str(data.get("host"), _at(path, "host"))
    if not host:
        raise Invalid(_at(path, "host"), "is required")
    if host == "*" or "*" in host:
        raise Invalid(_at(path, "host"), f"{show(host)}: a destination host cannot be a wildcard")
    subset = _str(data.get("subset"), _at(path, "subset"))
    if subset and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", subset):
        raise Invalid(_at(path, "subset"), f"{show(subset)} is not a valid subset name")
    port = None
    if data.get("port") is not None:
        ppath = _at(path, "port")
        pdata = _map(data["port"], ppath)
        _only(pdata, ppath, ("number",))
        if pdata.get("number") not in (None, 0):
            port = _port(pdata["number"], _at(ppath, "number"), digit_strings=False)
    return Destination(reader.qualify(host), port, subset)


def _vs_headers(value: object, path: str) -> tuple[HeaderOps, HeaderOps, str | None]:
    """Istio `headers`: request and response edits, and an authority set through them."""
    data = _map(value, path)
    _only(data, path, ("request", "response"))
    out: list[HeaderOps] = []
    authority: str | None = None
    for side in ("request", "response"):
        spath = _at(path, side)
        ops = _map(data.get(side), spath)
        _only(ops, spath, ("set", "add", "remove"))
        edits: dict[str, list[tuple[str, str]]] = {"set": [], "add": []}
        for verb in ("set", "add"):
            vpath = _at(spath, verb)
            for name, item in sorted(_map(ops.get(verb), vpath).items()):
                ipath = _at(vpath, name)
                _header_name(name, ipath, pseudo=True)
                text = _header_value(item, ipath)
                if side == "request" and _is_authority(name):
                    if authority is not None:
                        raise Invalid(ipath, "authority header cannot be set multiple times")
                    authority = text
                    continue
                _editable(name, ipath)
                edits[verb].append((name, text))
        removes = []
        for i, name in enumerate(_strings(ops.get("remove"), _at(spath, "remove"))):
            _editable(name, _at(_at(spath, "remove"), i))
            removes.append(name)
        out.append(HeaderOps(tuple(edits["set"]), tuple(edits["add"]), tuple(removes)))
    return out[0], out[1], authority


def _percentage(value: object, path: str) -> float:
    data = _map(value, path)
    _only(data, path, ("value",))
    percent = _number(data.get("value", 0), _at(path, "value"), 0.0, 100.0)
    if 0 < percent < 0.0001:
        raise Invalid(_at(path, "value"), f"{percent} is neither 0 nor in [0.0001, 100]")
    return percent


def _vs_fault(reader: Reader, value: object, path: str) -> FaultPolicy | None:
    data = _map(value, path)
    _only(data, path, ("delay", "abort"))
    if data.get("delay") is None and data.get("abort") is None:
        raise Invalid(path, "HTTP fault injection must have an abort and/or a delay")
    delay = None
    delay_percent = 0.0
    if data.get("delay") is not None:
        dpath = _at(path, "delay")
        d = _map(data["delay"], dpath)
        _only(d, dpath, ("fixedDelay", "exponentialDelay", "percentage", "percent"))
        if d.get("exponentialDelay") is not None:
            raise Invalid(_at(dpath, "exponentialDelay"), "exponentialDelay is not supported")
        if d.get("fixedDelay") is None:
            raise Invalid(_at(dpath, "fixedDelay"), "is required")
        delay = _duration(d["fixedDelay"], _at(dpath, "fixedDelay"))
        if d.get("percentage") is not None:
            delay_percent = _percentage(d["percentage"], _at(dpath, "percentage"))
        elif d.get("percent") is not None:
            delay_percent = float(_int(d["percent"], _at(dpath, "percent"), 0, 100))
        else:
            reader.note(_at(dpath, "percentage"), "not set: no request is delayed")
    status = grpc = None
    abort_percent = 0.0
    if data.get("abort") is not None:
        apath = _at(path, "abort")
        a = _map(data["abort"], apath)
        _only(a, apath, ("httpStatus", "grpcStatus", "http2Error", "percentage"))
        kinds = [k for k in ("httpStatus", "grpcStatus", "http2Error") if a.get(k) is not None]
        if len(kinds) != 1:
            raise Invalid(apath, "exactly one of httpStatus, grpcStatus, http2Error is required")
        if kinds[0] == "http2Error":
            raise Invalid(_at(apath, "http2Error"), "HTTP/2 abort fault injection is not supported")
        if kinds[0] == "httpStatus":
            status = _int(a["httpStatus"], _at(apath, "httpStatus"), 200, 599)
        else:
            name = _str(a["grpcStatus"], _at(apath, "grpcStatus"))
            if name not in GrpcStatus.__members__:
                raise Invalid(
                    _at(apath, "grpcStatus"), f"{show(name)} is not a gRPC status such as NOT_FOUND"
                )
            grpc = int(GrpcStatus[name])
        if a.get("percentage") is not None:
            abort_percent = _percentage(a["percentage"], _at(apath, "percentage"))
        else:
            reader.note(_at(apath, "percentage"), "not set: no request is aborted")
    return FaultPolicy(delay, delay_percent, status, grpc, abort_percent)


def _vs_retries(value: object, path: str) -> RetryPolicy | None:
    data = _map(value, path)
    _only(
        data,
        path,
        [
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ],
    )
    attempts = _int(data.get("attempts", 0), _at(path, "attempts"), 0, 2**31 - 1)
    retry_on = _str(data.get("retryOn"), _at(path, "retryOn"))
    per_try = None
    if data.get("perTryTimeout") is not None:
        per_try = _duration(data["perTryTimeout"], _at(path, "perTryTimeout"))
    if data.get("retryRemoteLocalities") is not None:
        _bool(data["retryRemoteLocalities"], _at(path, "retryRemoteLocalities"))
    if attempts == 0 and (
        per_try is not None or retry_on or data.get("retryRemoteLocalities") is not None
    ):
        raise Invalid(path, "http retry policy configured when attempts are set to 0 (disabled)")
    backoff = None
    if data.get("backoff") is not None:
        backoff = _duration(data["backoff"], _at(path, "backoff"))
    ignore = None
    if data.get("retryIgnorePreviousHosts") is not None:
        ignore = _bool(data["retryIgnorePreviousHosts"], _at(path, "retryIgnorePreviousHosts"))
    try:
        return retry_policy(
            attempts=attempts,
            retry_on=retry_on or None,
            per_try_timeout=per_try,
            backoff=backoff,
            ignore_previous_hosts=ignore,
        )
    except ValueError as exc:
        raise Invalid(_at(path, "retryOn"), str(exc)) from None


def _vs_redirect(value: object, path: str, matches: list[RequestMatch]) -> Redirect:
    data = _map(value, path)
    _only(
        data,
        path,
        ("uri", "authority", "port", "derivePort", "scheme", "redirectCode", "prefixRewrite"),
    )
    uri = _str(data.get("uri"), _at(path, "uri")) or None
    prefix = _str(data.get("prefixRewrite"), _at(path, "prefixRewrite")) or None
    authority = _str(data.get("authority"), _at(path, "authority")) or None
    scheme = _str(data.get("scheme"), _at(path, "scheme")) or None
    if uri and prefix:
        raise Invalid(path, "redirect may only specify one of uri or prefixRewrite")
    if prefix:
        for m in matches:
            if m.path is not None and m.path.kind is not MatchKind.PREFIX:
                raise Invalid(
                    _at(path, "prefixRewrite"), "requires all uri matches to be prefix matches"
                )
    if scheme not in (None, "http", "https"):
        raise Invalid(_at(path, "scheme"), 'must be "http" or "https"')
    if data.get("port") is not None and data.get("derivePort") is not None:
        raise Invalid(path, "only one of port and derivePort may be set")
    port = None
    mode = PortMode.KEEP
    if data.get("port") not in (None, 0):
        port = _port(data["port"], _at(path, "port"), digit_strings=False)
    if data.get("derivePort") is not None:
        derive = _str(data["derivePort"], _at(path, "derivePort"))
        if derive == "FROM_REQUEST_PORT":
            mode = PortMode.REQUEST
        elif derive == "FROM_PROTOCOL_DEFAULT":
            mode = PortMode.PROTOCOL_DEFAULT
        else:
            raise Invalid(
                _at(path, "derivePort"),
                f"{show(derive)} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT",
            )
    if not (uri or prefix or authority or scheme or port or data.get("derivePort")):
        raise Invalid(path, "redirect must specify uri, authority, scheme, or port")
    code = data.get("redirectCode")
    status = 301 if code in (None, 0) else _int(code, _at(path, "redirectCode"), 300, 399)
    if status not in (301, 302, 303, 307, 308):
        raise Invalid(_at(path, "redirectCode"), f"redirect code {status} is not supported")
    return Redirect(status, scheme, authority, port, mode, uri, prefix)


def _vs_direct_response(value: object, path: str) -> DirectResponse:
    data = _map(value, path)
    _only(data, path, ("status", "body"))
    if data.get("status") is None:
        raise Invalid(_at(path, "status"), "is required")
    status = _int(data["status"], _at(path, "status"), 200, 599)
    bpath = _at(path, "body")
    body_data = _map(data.get("body"), bpath)
    _only(body_data, bpath, ("string", "bytes"))
    if "string" in body_data and "bytes" in body_data:
        raise Invalid(bpath, "only one of string and bytes may be set")
    body = b""
    if "string" in body_data:
        try:
            body = _str(body_data["string"], _at(bpath, "string")).encode()
        except UnicodeEncodeError:  # a lone surrogate, which YAML and JSON escapes can give
            raise Invalid(_at(bpath, "string"), "is not valid Unicode text") from None
    elif "bytes" in body_data:
        text = _str(body_data["bytes"], _at(bpath, "bytes"))
        try:
            body = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Invalid(_at(bpath, "bytes"), "is not base64") from None
    if len(body) > MAX_DIRECT_RESPONSE_BYTES:
        raise Invalid(bpath, "a direct response body must be smaller than 1MB")
    return DirectResponse(status, body)


def _vs_rewrite(value: object, path: str) -> Rewrite:
    data = _map(value, path)
    _only(data, path, ("uri", "uriRegexRewrite", "authority"))
    uri = _str(data.get("uri"), _at(path, "uri")) or None
    authority = _str(data.get("authority"), _at(path, "authority")) or None
    regex = None
    substitution = ""
    if data.get("uriRegexRewrite") is not None:
        rpath = _at(path, "uriRegexRewrite")
        r = _map(data["uriRegexRewrite"], rpath)
        _only(r, rpath, ("match", "rewrite"))
        text = _str(r.get("match"), _at(rpath, "match"))
        substitution = _str(r.get("rewrite"), _at(rpath, "rewrite"))
        if not text or not substitution:
            raise Invalid(rpath, "uriRegexRewrite requires both match and rewrite")
        regex = ValueMatch(MatchKind.REGEX, text, pattern=_regex(text, _at(rpath, "match")))
        try:
            re2_substitution(substitution)
        except ValueError as exc:
            raise Invalid(_at(rpath, "rewrite"), str(exc)) from None
        if uri is not None:
            raise Invalid(path, "rewrite may only contain one of uri or uriRegexRewrite")
    if uri is None and regex is None and authority is None:
        raise Invalid(path, "rewrite must specify at least one of uri, uriRegexRewrite, authority")
    return Rewrite(prefix=uri, regex=regex, substitution=substitution, authority=authority)


def _vs_route(reader: Reader, value: object, path: str, index: int) -> Route | None:
    data = _map(value, path)
    _only(
        data,
        path,
        [
            "name",
            "match",
            "route",
            "redirect",
            "directResponse",
            "delegate",
            "rewrite",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrors",
            "mirrorPercentage",
            "mirrorPercent",
            "mirror_percent",
            "corsPolicy",
            "headers",
        ],
    )
    rule_name = _str(data.get("name"), _at(path, "name"))
    if data.get("delegate") is not None:
        raise Invalid(_at(path, "delegate"), "delegate is not supported by the waypoint")
    if data.get("corsPolicy") is not None:
        reader.note(_at(path, "corsPolicy"), "CORS is not applied by the waypoint")
    raw_matches = _list(data.get("match"), _at(path, "match"))
    matches: list[RequestMatch] = []
    for i, item in enumerate(raw_matches):
        if item is None:
            matches.append(MATCH_ALL)
            continue
        match = _vs_match(reader, item, _at(_at(path, "match"), i))
        if match is not None:
            matches.append(match)
    has = {k: data.get(k) is not None for k in ("redirect", "directResponse", "fault", "rewrite")}
    dests = _list(data.get("route"), _at(path, "route"))
    has["route"] = bool(dests)
    if has["redirect"]:
        for other in ("route", "fault", "rewrite", "directResponse"):
            if has[other]:
                raise Invalid(path, f"HTTP route cannot contain both {other} and redirect")
    elif has["directResponse"]:
        for other in ("route", "fault", "rewrite"):
            if has[other]:
                raise Invalid(path, f"HTTP route cannot contain both {other} and directResponse")
    elif not dests:
        raise Invalid(path, "HTTP route, redirect or directResponse is required")

    request_ops, response_ops, header_authority = _vs_headers(
        data.get("headers"), _at(path, "headers")
    )
    rewrite = None
    if has["rewrite"]:
        rewrite = _vs_rewrite(data["rewrite"], _at(path, "rewrite"))
        if rewrite.authority is not None and header_authority is not None:
            raise Invalid(path, "authority header cannot be set multiple times")
    if header_authority is not None:
        rewrite = (
            Rewrite(authority=header_authority)
            if rewrite is None
            else replace(rewrite, authority=header_authority)
        )
    action: RouteAction
    if has["redirect"]:
        action = _vs_redirect(data["redirect"], _at(path, "redirect"), matches)
    elif has["directResponse"]:
        action = _vs_direct_response(data["directResponse"], _at(path, "directResponse"))
    else:
        action = _vs_destinations(reader, dests, _at(path, "route"))
    timeout = None
    if data.get("timeout") is not None:
        timeout = _duration(data["timeout"], _at(path, "timeout"))
    retry: RetryPolicy | None = DEFAULT_RETRY_POLICY
    if data.get("retries") is not None:
        retry = _vs_retries(data["retries"], _at(path, "retries"))
    fault = _vs_fault(reader, data["fault"], _at(path, "fault")) if has["fault"] else None
    mirrors = _vs_mirrors(reader, data, path)
    if raw_matches and not matches:
        return None
    return Route(
        reader.source(index, rule_name=rule_name),
        action,
        tuple(matches) if matches else (MATCH_ALL,),
        request_ops,
        response_ops,
        rewrite,
        timeout,
        retry if isinstance(action, Forward) else None,
        fault,
        mirrors if isinstance(action, Forward) else (),
    )


def _vs_destinations(reader: Reader, items: list[Any], path: str) -> Forward:
    dests: list[Destination] = []
    for i, item in enumerate(items):
        ipath = _at(path, i)
        data = _map(item, ipath)
        if item is None:
            raise Invalid(ipath, "must not be null")
        _only(data, ipath, ("destination", "weight", "headers"))
        dest = _destination(reader, data.get("destination"), _at(ipath, "destination"))
        weight = _int(data.get("weight", 0), _at(ipath, "weight"), 0, 2**31 - 1)
        req, resp, authority = _vs_headers(data.get("headers"), _at(ipath, "headers"))
        dests.append(Destination(dest.host, dest.port, dest.subset, weight, req, resp, authority))
    if len(dests) > 1:
        if sum(d.weight for d in dests) == 0:
            raise Invalid(path, "total destination weight = 0")
        dests = [d for d in dests if d.weight > 0]
    return Forward(tuple(dests))


def _vs_mirrors(reader: Reader, data: Mapping[str, Any], path: str) -> tuple[Mirror, ...]:
    out: list[Mirror] = []
    if data.get("mirror") is not None:
        dest = _destination(reader, data["mirror"], _at(path, "mirror"))
        percent = 100.0
        if data.get("mirrorPercentage") is not None:
            percent = _percentage(data["mirrorPercentage"], _at(path, "mirrorPercentage"))
        else:
            for key in ("mirrorPercent", "mirror_percent"):
                if data.get(key) is not None:
                    percent = float(_int(data[key], _at(path, key), 0, 100))
        if percent > 0:
            out.append(Mirror(dest, percent))
    for i, item in enumerate(_list(data.get("mirrors"), _at(path, "mirrors"))):
        ipath = _at(_at(path, "mirrors"), i)
        m = _map(item, ipath)
        if item is None:
            raise Invalid(ipath, "mirror cannot be null")
        _only(m, ipath, ("destination", "percentage"))
        dest = _destination(reader, m.get("destination"), _at(ipath, "destination"))
        percent = 100.0
        if m.get("percentage") is not None:
            percent = _percentage(m["percentage"], _at(ipath, "percentage"))
        if percent > 0:
            out.append(Mirror(dest, percent))
    return tuple(out)


def read_virtual_service(reader: Reader, resource: Resource) -> VirtualServiceRoutes | None:
    spec = _map(resource.body.get("spec"), "spec")
    _only(spec, "spec", ("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    hosts = _strings(spec.get("hosts"), "spec.hosts")
    if not hosts:
        raise Invalid("spec.hosts", "is required (at least one host)")
    _strings(spec.get("exportTo"), "spec.exportTo")
    gateways = _strings(spec.get("gateways"), "spec.gateways")
    for key in ("tcp", "tls"):
        if _list(spec.get(key), f"spec.{key}"):
            reader.note(
                f"spec.{key}", "TCP and TLS routes are not applied by the waypoint's L7 routing"
            )
    routes: list[Route] = []
    for i, item in enumerate(_list(spec.get("http"), "spec.http")):
        route = _vs_route(reader, item, _at("spec.http", i), i)
        if route is not None:
            routes.append(route)
    if gateways and MESH_GATEWAY not in gateways:
        reader.note("spec.gateways", "does not include mesh: not applied by waypoints")
        return None
    return VirtualServiceRoutes(
        reader.namespace,
        reader.name,
        reader.created,
        tuple(reader.qualify(h) for h in hosts),
        tuple(routes),
    )
