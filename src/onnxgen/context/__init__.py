"""Backend context: ahead-of-time compiled blobs per backend, scoped by node metadata, with the
original graph kept as the fallback (docs/BackendContext.md).

    from onnxgen import context
    context.annotate("m/model.onnx", backend="openvino")      # scopes + manifest
    context.compile("m/model.onnx", "openvino")               # blobs in m/model.context/
    print(context.inspect("m/model.onnx"))                    # scopes, blobs, validity here
    session = context.load("m/model.onnx")                    # blobs where valid, else the graph
    outputs = session.run(None, feeds)
"""

from .format import (MANIFEST_KEY, SCHEMA, SCOPE_KEY, Blob, ContextError, ContextWarning, Manifest, Report, Scope,
                     check, content_hash, read_manifest)
from .epcontext import import_epcontext
from .load import Session, load
from .tools import annotate, compile, inspect, strip

__all__ = ["MANIFEST_KEY", "SCHEMA", "SCOPE_KEY", "Blob", "ContextError", "ContextWarning", "Manifest", "Report",
           "Scope", "Session", "annotate", "check", "compile", "content_hash", "import_epcontext", "inspect", "load",
           "read_manifest", "strip"]
