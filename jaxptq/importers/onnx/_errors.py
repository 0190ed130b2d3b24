"""Exceptions raised by the ONNX importer, so callers can catch what they can act on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class OnnxImportError(ValueError):
    """The file or ModelProto is not a usable ONNX model (unreadable, truncated, unsafe)."""


class UnsupportedOnnxError(NotImplementedError):
    """The model needs op types or an opset the importer does not implement.

    Attributes:
        ops: unsupported op type (``domain::op`` outside the default domain) -> node names.
        opset: the model's ``ai.onnx`` opset version.
    """

    def __init__(self, message: str, ops: Mapping[str, Sequence[str]], opset: int | None):
        super().__init__(message)
        self.ops = {k: list(v) for k, v in ops.items()}
        self.opset = opset


class OnnxNodeError(RuntimeError):
    """A node failed while the imported function ran; names the node and its op type.

    Attributes:
        node_name: the ONNX node's name (or ``OpType_index`` for unnamed nodes).
        op_type: the node's op type.
    """

    def __init__(self, node_name: str, op_type: str, cause: BaseException):
        super().__init__(
            f"ONNX node `{node_name}` ({op_type}) failed: {type(cause).__name__}: {cause}"
        )
        self.node_name = node_name
        self.op_type = op_type
