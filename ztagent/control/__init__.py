"""The control plane: Kubernetes and Istio resources in, the node agent's model out.

`sources` reads resources (a directory of YAML files), `translate` turns them into the
`ConfigSnapshot` of workloads, services and L4 policies the node agent enforces.
"""

from ztagent.control.sources import SourceBatch, parse_documents, read_directory, read_file
from ztagent.control.translate import (
    TranslateOptions,
    Translation,
    to_local_config,
    translate,
    translate_resources,
)
from ztagent.istio.envelope import Resource, ResourceError

__all__ = [
    "Resource",
    "ResourceError",
    "SourceBatch",
    "TranslateOptions",
    "Translation",
    "parse_documents",
    "read_directory",
    "read_file",
    "to_local_config",
    "translate",
    "translate_resources",
]
