"""jaxptq: post-training quantization of JAX, Flax and ONNX models to real int8 programs."""

from jaxptq.accuracy_control import AccuracyControlResult as AccuracyControlResult
from jaxptq.accuracy_control import ptq_with_accuracy_control as ptq_with_accuracy_control
from jaxptq.api import apply_plan as apply_plan
from jaxptq.api import ptq as ptq
from jaxptq.config import ConfigError as ConfigError
from jaxptq.config import QuantConfig as QuantConfig
from jaxptq.export import export_onnx as export_onnx
from jaxptq.export import export_stablehlo as export_stablehlo
from jaxptq.export import load_stablehlo as load_stablehlo
from jaxptq.importers.onnx import import_onnx as import_onnx
from jaxptq.kvcache import FloatKVCache as FloatKVCache
from jaxptq.kvcache import QuantKVCache as QuantKVCache
from jaxptq.kvcache import kv_cache_from_config as kv_cache_from_config
from jaxptq.plan import QuantPlan as QuantPlan
from jaxptq.plan import SitePlan as SitePlan
from jaxptq.rewrite import QuantizedFunction as QuantizedFunction

__all__ = [
    "AccuracyControlResult",
    "ConfigError",
    "FloatKVCache",
    "QuantKVCache",
    "QuantConfig",
    "QuantPlan",
    "QuantizedFunction",
    "SitePlan",
    "apply_plan",
    "export_onnx",
    "export_stablehlo",
    "import_onnx",
    "kv_cache_from_config",
    "load_stablehlo",
    "ptq",
    "ptq_with_accuracy_control",
]
