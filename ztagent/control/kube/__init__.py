"""The control plane's Kubernetes API side: resources from a cluster, callers from TokenReview.

`KubernetesSource` owns reading the cluster. It lists, then watches, every kind the control
plane cares about (`DEFAULT_KINDS`: Namespace, Pod, Service, EndpointSlice, the Istio
networking and security kinds, Gateway API Gateway and HTTPRoute), keeps the current set of
objects keyed by (group, kind, namespace, name), and hands the whole set to a callback as a
`SourceBatch`, the same shape the YAML-directory source produces, after the initial list of
every kind and after every change. Objects stay plain dicts in the API's JSON form (camelCase,
as in YAML documents) with `apiVersion` and `kind` set; each becomes a `Resource` named
`kubernetes:<Kind>/<namespace>/<name>` (`kubernetes:<Kind>/<name>` when cluster-scoped).

The watch follows the API's rules: resume from the last `resourceVersion` (bookmarks
included) after a dropped stream, with a backoff of 100 ms doubling to 15 s; relist on
410 Gone. A kind whose group or CRD the server does not serve is logged once and skipped, and
looked for again every minute. Istio and Gateway API kinds use the first version of
`KindSpec.versions` the server serves, else the server's preferred version. An object without
a usable envelope (no name, no namespace for a namespaced kind) becomes a `ResourceError` in
the batch; nothing about one object stops the others.

`TokenReviewAuthenticator` is the cluster mode's `Authenticator`: it asks the API server to
review the caller's bearer token (authentication.k8s.io/v1 TokenReview, audience `istio-ca`)
and turns the reviewed service account, pod and node into a `Caller`. When the API cannot
answer, it raises `AuthenticationUnavailable`, so the CA can tell the caller to retry rather
than that its token is bad.

`load_api_client` builds a client from the in-cluster service account when
`KUBERNETES_SERVICE_HOST` is set, else from `KUBECONFIG` or `~/.kube/config`.

Modules, one concern each: `kinds` (`KindSpec`, `DEFAULT_KINDS`), `api` (the client, requests
with bounded bodies, watch lines), `source` (`KubernetesSource`: objects to resources, list
and watch), `tokenreview` (`TokenReviewAuthenticator`). Callers import from the package.
"""

from ztagent.control.auth import AuthenticationUnavailable
from ztagent.control.kube.api import load_api_client
from ztagent.control.kube.kinds import DEFAULT_KINDS, KindSpec
from ztagent.control.kube.source import (
    DEFAULT_BACKOFF_INITIAL,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_REDISCOVER_INTERVAL,
    KubernetesSource,
)
from ztagent.control.kube.tokenreview import TokenReviewAuthenticator

__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_KINDS",
    "DEFAULT_REDISCOVER_INTERVAL",
    "AuthenticationUnavailable",
    "KindSpec",
    "KubernetesSource",
    "TokenReviewAuthenticator",
    "load_api_client",
]
