"""Pipelines and devices by GenAI framework name: the working group's factories, in Python.

Mirrors ``pipeline_factory.hpp``, ``device_factory.hpp`` and ``data_types.hpp`` (``onnx::genai``)::

    from onnxgen.pipelines.factory import DeviceFactory, Text2TextPipelineFactory, Text2ImagePipelineFactory

    devices = DeviceFactory.get_instance().enumerate("onnxgen")          # [Device("CPU", {...})]
    pipe = Text2TextPipelineFactory.get_instance().create("onnxgen", "model_dir", devices)
    image = Text2ImagePipelineFactory.get_instance().create("onnxgen", "sd_dir", devices)

A framework registers a creator ``creator(models_path, devices) -> pipeline`` under its name, and a
device enumerator ``enumerator() -> [Device]``; the application picks a framework by name.  An
unregistered name raises ``UnregisteredFramework`` with the header's message ("Unregistered GenAI
framework: NAME").  Registered here, when their packages import:

- ``onnxgen``: text-to-text (the serving engine) and text-to-image (onnxruntime), CPU.
- ``onnxruntime-genai``: text-to-text over its ``Model``/``Generator`` (a folder its model builder
  made, with ``genai_config.json``); devices are onnxruntime's execution providers.
- ``openvino-genai``: text-to-text over ``LLMPipeline`` and text-to-image over
  ``Text2ImagePipeline`` (folders optimum-intel made); devices are OpenVINO's.

Every adapter's text-to-text call takes ``(prompt, max_new_tokens=..., **options)`` and returns an
object with ``texts`` and ``token_ids`` (greedy unless told otherwise); every text-to-image call
returns uint8 images ``[N, H, W, 3]``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class UnregisteredFramework(RuntimeError):
    """No creator or device enumerator is registered under this name."""


@dataclass
class Device:
    """A device a framework offers: ``identifier`` ("CPU", "GPU.0", "CUDAExecutionProvider") and options."""

    identifier: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tensor:
    """``onnx::genai::Tensor``: data (here a numpy array), its shape and type, and the framework it came from.

    ``type_id`` is the ONNX element type (``onnx.TensorProto`` numbering: 1 float32, 2 uint8, 7 int64, …).
    """

    data: np.ndarray
    framework_id: str = "onnxgen"

    def __post_init__(self):
        self.data = np.asarray(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def type_id(self) -> int:
        from onnx import helper

        return int(helper.np_dtype_to_tensor_dtype(self.data.dtype))

    def numpy(self) -> np.ndarray:
        return self.data

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)


Creator = Callable[[Path, Sequence[Device]], Any]
Enumerator = Callable[[], list[Device]]


class _Registry:
    """A singleton registry of named entries (``get_instance()``, ``register``, ``names``)."""

    _instance = None
    kind = ""

    def __init__(self):
        self._entries: dict[str, Callable] = {}

    @classmethod
    def get_instance(cls):
        if cls.__dict__.get("_instance") is None:
            cls._instance = cls()
            _register_builtin(cls._instance)
        return cls._instance

    def register(self, name: str, entry: Callable) -> None:
        """Register (or replace) the ``entry`` of framework ``name``."""
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _get(self, name: str) -> Callable:
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise UnregisteredFramework(f"Unregistered GenAI framework: {name} ({self.kind} registered: {known})")
        return self._entries[name]


class DeviceFactory(_Registry):
    """``DeviceFactory.get_instance().enumerate("onnxgen")`` -> the devices that framework offers."""

    kind = "device enumerators"

    def enumerate(self, name: str) -> list[Device]:
        return list(self._get(name)())


class _PipelineFactory(_Registry):
    kind = "pipelines"

    def create(self, name: str, models_path: str | Path | None, devices: Sequence[Device] | None = None):
        """A pipeline of framework ``name`` over ``models_path`` on ``devices`` (default: its first device)."""
        creator = self._get(name)
        if not devices:
            devices = DeviceFactory.get_instance().enumerate(name)[:1] if name in DeviceFactory.get_instance().names() \
                else [Device("CPU")]
        return creator(Path(models_path) if models_path is not None else None, list(devices))


class Text2TextPipelineFactory(_PipelineFactory):
    kind = "text-to-text pipelines"


class Text2ImagePipelineFactory(_PipelineFactory):
    kind = "text-to-image pipelines"


@dataclass
class TextResults:
    """What the adapters' text-to-text calls return (as onnxgen's DecodedResults: texts, token ids)."""

    texts: list[str]
    token_ids: list[list[int]]

    def __str__(self) -> str:
        return self.texts[0] if len(self.texts) == 1 else "\n".join(self.texts)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# onnxgen --------------------------------------------------------------------------------------------

def _onnxgen_devices() -> list[Device]:
    return [Device("CPU", {"provider": "CPUExecutionProvider"})]


def _device_name(devices: Sequence[Device]) -> str:
    return devices[0].identifier if devices else "CPU"


def _onnxgen_text(models_path: Path | None, devices: Sequence[Device]):
    from .text2text import Text2TextPipeline  # the serving engine; imported only when asked for

    return Text2TextPipeline(models_path, device=_device_name(devices))


def _onnxgen_image(models_path: Path | None, devices: Sequence[Device]):
    from .text2image import Text2ImagePipeline

    return Text2ImagePipeline(models_path, device=_device_name(devices))


# onnxruntime-genai ----------------------------------------------------------------------------------

def _ort_devices() -> list[Device]:
    import onnxruntime as ort

    names = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml",
             "WebGpuExecutionProvider": "webgpu", "OpenVINOExecutionProvider": "openvino"}
    return [Device(names.get(p, p), {"provider": p}) for p in ort.get_available_providers()]


class OrtGenAIText2Text:
    """onnxruntime-genai's Model/Tokenizer/Generator behind the text-to-text call (greedy by default).

    A prompt is a string or a list of token ids; a list of those is a batch (run one by one: its
    CPU path batches statically and pads).
    """

    def __init__(self, models_path: Path, devices: Sequence[Device]):
        import onnxruntime_genai as og

        self.og = og
        device = _device_name(devices).lower()
        if device in ("cpu", "cpuexecutionprovider"):
            config = og.Config(str(models_path))
            config.clear_providers()
            self.model = og.Model(config)
        else:
            self.model = og.Model(str(models_path))
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.og.Tokenizer(self.model)
        return self._tokenizer

    def __call__(self, prompt, max_new_tokens: int = 32, **options) -> TextResults:
        single = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        texts, ids = [], []
        for item in prompts:
            tokens = self.tokenizer.encode(item) if isinstance(item, str) else np.asarray(item, np.int32)
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=len(tokens) + max_new_tokens, do_sample=False, **options)
            generator = self.og.Generator(self.model, params)
            generator.append_tokens(np.asarray(tokens, np.int32).reshape(1, -1))
            new = []
            while not generator.is_done() and len(new) < max_new_tokens:
                generator.generate_next_token()
                new.append(int(generator.get_next_tokens()[0]))
            texts.append(self.tokenizer.decode(new) if isinstance(item, str) else "")
            ids.append(new)
        return TextResults(texts, ids)


# openvino-genai -------------------------------------------------------------------------------------

def _ov_devices() -> list[Device]:
    import openvino as ov

    core = ov.Core()
    return [Device(d, {"full_name": core.get_property(d, "FULL_DEVICE_NAME")}) for d in core.available_devices]


def _ov_properties(devices: Sequence[Device]) -> dict[str, Any]:
    """OpenVINO properties for a pipeline: the device's upper-case config entries, and fp32 inference
    unless told otherwise (on a CPU with bf16 or AMX OpenVINO's default is bf16, whose greedy tokens
    and images are not fp32's)."""
    config = devices[0].config if devices else {}
    properties = {k: v for k, v in config.items() if k.isupper()}
    properties.setdefault("INFERENCE_PRECISION_HINT", "f32")
    return properties


class OVGenAIText2Text:
    """OpenVINO GenAI's LLMPipeline behind the text-to-text call (greedy by default).

    A prompt is a string (encoded with the pipeline's tokenizer, special tokens added) or a list of
    token ids; a list of those is a batch (run one by one).  ``token_ids`` are the ids the model
    generated (``EncodedResults.tokens``), not a re-encoding of the decoded text.
    """

    def __init__(self, models_path: Path, devices: Sequence[Device]):
        import openvino_genai as ov_genai

        self.ov_genai = ov_genai
        self.pipeline = ov_genai.LLMPipeline(str(models_path), _device_name(devices), **_ov_properties(devices))
        self.tokenizer = self.pipeline.get_tokenizer()

    def __call__(self, prompt, max_new_tokens: int = 32, **options) -> TextResults:
        import openvino as ov

        single = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        config = self.pipeline.get_generation_config()
        config.max_new_tokens = max_new_tokens
        config.do_sample = False
        for key, value in options.items():
            setattr(config, key, value)
        texts, ids = [], []
        for item in prompts:
            if isinstance(item, str):
                tokens = np.asarray(self.tokenizer.encode(item).input_ids.data).reshape(-1)
            else:
                tokens = np.asarray(item)
            result = self.pipeline.generate(ov.Tensor(tokens.astype(np.int64).reshape(1, -1)), config)
            new = [int(t) for t in result.tokens[0]]
            texts.append(self.tokenizer.decode(new) if isinstance(item, str) else "")
            ids.append(new)
        return TextResults(texts, ids)


class OVGenAIText2Image:
    """OpenVINO GenAI's Text2ImagePipeline behind the text-to-image call: uint8 ``[N, H, W, 3]``."""

    def __init__(self, models_path: Path, devices: Sequence[Device]):
        import openvino_genai as ov_genai

        self.pipeline = ov_genai.Text2ImagePipeline(str(models_path), _device_name(devices), **_ov_properties(devices))

    def __call__(self, prompt: str, **options) -> np.ndarray:
        names = {"image_width": "width", "image_height": "height"}
        kwargs = {names.get(k, k): v for k, v in options.items() if v is not None}
        if "seed" in kwargs:
            import openvino_genai as ov_genai

            kwargs["generator"] = ov_genai.TorchGenerator(kwargs.pop("seed"))
        return np.asarray(self.pipeline.generate(prompt, **kwargs).data)


def _register_builtin(registry: _Registry) -> None:
    """Fill a new registry with the frameworks whose packages import."""
    ort_genai, ov_genai = _available("onnxruntime_genai"), _available("openvino_genai")
    if isinstance(registry, DeviceFactory):
        registry.register("onnxgen", _onnxgen_devices)
        if ort_genai:
            registry.register("onnxruntime-genai", _ort_devices)
        if ov_genai:
            registry.register("openvino-genai", _ov_devices)
    elif isinstance(registry, Text2TextPipelineFactory):
        registry.register("onnxgen", _onnxgen_text)
        if ort_genai:
            registry.register("onnxruntime-genai", OrtGenAIText2Text)
        if ov_genai:
            registry.register("openvino-genai", OVGenAIText2Text)
    elif isinstance(registry, Text2ImagePipelineFactory):
        registry.register("onnxgen", _onnxgen_image)
        if ov_genai:
            registry.register("openvino-genai", OVGenAIText2Image)
