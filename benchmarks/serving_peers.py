"""The serving benchmark's peers: OpenVINO GenAI's ContinuousBatchingPipeline and onnxruntime-genai.

``bench_serving.py`` calls ``systems(checkpoint, requests)``: a name -> callable returning an
``onnxgen.engine.workload.Report`` per peer.  A peer that cannot be set up still gets its entry;
calling it raises an exception saying why (the benchmark prints it as n/a).  The models are
converted from the Hugging Face checkpoint the first time a peer is called (not timed), into
folders beside the checkpoint.

Set-up (once per machine; nothing here is needed by the tests):

    # 1. the runtimes, in the project's venv (they change no package already there):
    .venv/bin/pip install openvino-genai==2026.4.1.0 openvino-tokenizers==2026.4.1.0 onnxruntime-genai==0.18.0

    # 2. the OpenVINO converter (optimum-intel wants transformers<5.6, the project has 5.x):
    #    a separate venv outside the repository, used only in a subprocess for the conversion
    python3.11 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0+cpu   # the CPU wheel (here: from /opt/wheels)
    echo "torch==2.13.0+cpu" > /tmp/peers-constraints.txt
    /work/peers-venv/bin/pip install -c /tmp/peers-constraints.txt optimum-intel==2.2.0 \
        openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 "nncf>=3.3.0"
    /work/peers-venv/bin/pip uninstall -y torchvision   # PyPI's build fails to load with the CPU torch
                                                        # and breaks transformers' imports

    (``ONNXGEN_PEERS_VENV`` points elsewhere than /work/peers-venv.)

What each peer runs:
  * OpenVINO GenAI ``ContinuousBatchingPipeline`` on the IR of ``optimum-cli export openvino
    --task text-generation-with-past --weight-format fp32`` (no tokenizer: prompts are token ids),
    ``SchedulerConfig`` with 512 ``max_num_batched_tokens`` (dynamic split-fuse, no prefix cache),
    every request added as an ``ov.Tensor`` of ids with ``ignore_eos`` and exact
    ``min/max_new_tokens``, then ``step()`` while ``has_non_finished_requests()``, tokens read from
    each request's handle after every step.  fp32, and bf16 (``INFERENCE_PRECISION_HINT`` and
    ``KV_CACHE_PRECISION`` bf16) on the same IR.
  * onnxruntime-genai's ``Generator`` on the model builder's fp32 CPU model (``python -m
    onnxruntime_genai.models.builder -p fp32 -e cpu``; it wants a tokenizer in the input folder, so
    the checkpoint is linked into a folder with Mistral's SentencePiece model from mistral-common),
    static batches of 8, right-padded (its left-padded batches give wrong logits), each batch run
    until its longest output with ``min_length = max_length`` (eos ignored); each request's own
    length counts as its output, as in the transformers baseline.  Its builder refuses Mixtral.

``.venv/bin/python benchmarks/serving_peers.py`` checks each peer's greedy tokens against
transformers' ``generate`` on one short request (random llama-56M checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from onnxgen.engine.workload import Report

PEERS_VENV = Path(os.environ.get("ONNXGEN_PEERS_VENV", "/work/peers-venv"))
SETUP_HINT = "see the set-up at the top of benchmarks/serving_peers.py"
BATCH = 8
MAX_BATCHED_TOKENS = 512
THREADS = 2  # as the other systems of bench_serving


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _architecture(checkpoint: Path) -> str:
    return json.loads((checkpoint / "config.json").read_text()).get("architectures", ["?"])[0]


# --- OpenVINO GenAI ---------------------------------------------------------------------------

def openvino_ir(checkpoint: Path) -> Path:
    """The checkpoint as an OpenVINO IR (stateful, fp32 weights), converted once by optimum-intel
    in the separate venv."""
    target = checkpoint.parent / "openvino"
    if (target / "openvino_model.xml").exists():
        return target
    cli = PEERS_VENV / "bin" / "optimum-cli"
    if not cli.exists():
        raise RuntimeError(f"no optimum-cli in {PEERS_VENV} (optimum-intel needs transformers<5.6): {SETUP_HINT}")
    done = subprocess.run([str(cli), "export", "openvino", "-m", str(checkpoint), "--task", "text-generation-with-past",
                           "--weight-format", "fp32", "--disable-convert-tokenizer", str(target)],
                          capture_output=True, text=True)
    if done.returncode or not (target / "openvino_model.xml").exists():
        shutil.rmtree(target, ignore_errors=True)
        raise RuntimeError(f"optimum-cli export openvino failed on {_architecture(checkpoint)}: "
                           f"{_tail(done.stderr or done.stdout)}")
    return target


def _kv_bytes_per_token(checkpoint: Path, itemsize: int) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * head * itemsize


def openvino_pipeline(checkpoint: Path, requests, precision: str):
    try:
        import openvino_genai
    except ImportError as error:
        raise RuntimeError(f"openvino-genai is not installed ({error}): {SETUP_HINT}") from error
    ir = openvino_ir(checkpoint)
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_batched_tokens = MAX_BATCHED_TOKENS
    scheduler.dynamic_split_fuse = True
    scheduler.enable_prefix_caching = False
    # room for every request's whole sequence (1.5x for block rounding), in whole GB
    tokens = sum(len(p) + n for _, p, n in requests)
    need = 1.5 * tokens * _kv_bytes_per_token(checkpoint, 2 if precision == "bf16" else 4)
    scheduler.cache_size = max(1, math.ceil(need / 2**30))
    properties = {"INFERENCE_PRECISION_HINT": precision, "KV_CACHE_PRECISION": precision,
                  "INFERENCE_NUM_THREADS": THREADS}
    return openvino_genai.ContinuousBatchingPipeline(str(ir), scheduler, "CPU", properties)


def openvino_generation_config(output_len: int):
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.do_sample = False
    config.max_new_tokens = output_len
    config.min_new_tokens = output_len
    config.ignore_eos = True
    return config


def openvino_serve(checkpoint: Path, requests, precision: str) -> Report:
    """All requests through one ContinuousBatchingPipeline, each added at its arrival second."""
    import numpy as np
    import openvino as ov

    pipe = openvino_pipeline(checkpoint, requests, precision)
    pending = sorted(enumerate(requests), key=lambda item: item[1][0])
    handles: dict[int, object] = {}
    last: dict[int, float] = {}
    counts: dict[int, int] = {}
    report = Report(0.0, sum(len(p) for _, p, _ in requests), 0)
    start = time.perf_counter()
    while pending or pipe.has_non_finished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1][0] <= now:
            index, (_, prompt, output_len) = pending.pop(0)
            ids = ov.Tensor(np.array([prompt], dtype=np.int64))
            handles[index] = pipe.add_request(index, ids, openvino_generation_config(output_len))
        if not pipe.has_non_finished_requests():
            time.sleep(max(0.0, pending[0][1][0] - (time.perf_counter() - start)))
            continue
        pipe.step()
        stamp = time.perf_counter()
        for index, handle in handles.items():
            new = 0
            while handle.can_read():
                new += sum(len(output.generated_ids) for output in handle.read().values())
            if new:
                report.output_tokens += new
                counts[index] = counts.get(index, 0) + new
                if index in last:
                    report.itl.append(stamp - last[index])
                else:
                    report.ttft.append(stamp - start)
                last[index] = stamp
    report.seconds = time.perf_counter() - start
    wrong = {i: counts.get(i, 0) for i, (_, _, n) in enumerate(requests) if counts.get(i, 0) != n}
    if wrong:
        raise RuntimeError(f"OpenVINO GenAI gave other output lengths than asked: {wrong}")
    del pipe
    return report


def openvino_greedy(checkpoint: Path, prompt: list[int], output_len: int, precision: str = "f32") -> list[int]:
    import numpy as np
    import openvino as ov

    pipe = openvino_pipeline(checkpoint, [(0.0, prompt, output_len)], precision)
    handle = pipe.add_request(0, ov.Tensor(np.array([prompt], dtype=np.int64)), openvino_generation_config(output_len))
    tokens: list[int] = []
    while pipe.has_non_finished_requests():
        pipe.step()
        while handle.can_read():
            for output in handle.read().values():
                tokens.extend(output.generated_ids)
    return tokens


# --- onnxruntime-genai ------------------------------------------------------------------------

def onnxruntime_genai_model(checkpoint: Path, pad_token: int) -> Path:
    """The model builder's fp32 CPU model (built once), its genai_config set to two threads
    and to ``pad_token`` as the padding id."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"onnxruntime-genai is not installed ({error}): {SETUP_HINT}") from error
    target = checkpoint.parent / "onnxruntime-genai"
    if not (target / "genai_config.json").exists():
        source = checkpoint.parent / "onnxruntime-genai-input"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        for item in checkpoint.iterdir():  # the checkpoint as it is, plus a tokenizer the builder can load
            (source / item.name).symlink_to(item.resolve())
        if not (checkpoint / "tokenizer.model").exists() and not (checkpoint / "tokenizer.json").exists():
            from onnxgen.default_model import mistral_tokenizer_model

            shutil.copy(mistral_tokenizer_model(), source / "tokenizer.model")
            (source / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "legacy": True}))
        done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
                               "-o", str(target), "-p", "fp32", "-e", "cpu", "-c", str(checkpoint.parent / "ortg-cache")],
                              capture_output=True, text=True)
        if done.returncode or not (target / "genai_config.json").exists():
            shutil.rmtree(target, ignore_errors=True)
            raise RuntimeError(f"onnxruntime-genai's model builder failed on {_architecture(checkpoint)}: "
                               f"{_tail(done.stderr or done.stdout, 1)}")
    path = target / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["pad_token_id"] = pad_token
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
    path.write_text(json.dumps(config, indent=4))
    return target


def _pad_token(requests) -> int:
    """An id absent from every prompt: onnxruntime-genai masks the pad id wherever it appears."""
    used = {t for _, p, _ in requests for t in p}
    return next(t for t in (2, 0, 1, *range(3, 1 << 20)) if t not in used)


def onnxruntime_genai_batch(model, batch, pad: int, on_step: Callable[[list[int]], None] | None = None) -> None:
    """One right-padded static batch, until its longest output (eos ignored)."""
    import numpy as np
    import onnxruntime_genai as og

    width = max(len(p) for _, p, _ in batch)
    longest = max(n for _, _, n in batch)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + longest, min_length=width + longest, do_sample=False,
                              batch_size=len(batch))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([p + [pad] * (width - len(p)) for _, p, _ in batch], dtype=np.int32))
    for _ in range(longest):
        generator.generate_next_token()
        if on_step:
            on_step(generator.get_next_tokens().tolist())
    del generator


def onnxruntime_genai_static(checkpoint: Path, requests) -> Report:
    import numpy as np
    import onnxruntime_genai as og

    pad = _pad_token(requests)
    model = og.Model(str(onnxruntime_genai_model(checkpoint, pad)))
    report = Report(0.0, sum(len(p) for _, p, _ in requests), 0)
    start = time.perf_counter()
    for first in range(0, len(requests), BATCH):
        batch = requests[first:first + BATCH]
        stamps: list[float] = []
        onnxruntime_genai_batch(model, batch, pad, lambda _: stamps.append(time.perf_counter()))
        for _, _, n in batch:
            report.output_tokens += n
            report.ttft.append(stamps[0] - start)
            report.itl.extend(np.diff(stamps[:n]).tolist())
    report.seconds = time.perf_counter() - start
    del model
    return report


def onnxruntime_genai_greedy(checkpoint: Path, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """Greedy tokens of one right-padded batch of ``prompts``."""
    import onnxruntime_genai as og

    batch = [(0.0, p, output_len) for p in prompts]
    pad = _pad_token(batch)
    model = og.Model(str(onnxruntime_genai_model(checkpoint, pad)))
    steps: list[list[int]] = []
    onnxruntime_genai_batch(model, batch, pad, steps.append)
    return [[step[i] for step in steps] for i in range(len(prompts))]


# --- the benchmark's entry point --------------------------------------------------------------

def systems(checkpoint: Path, requests) -> dict[str, Callable[[], Report]]:
    checkpoint = Path(checkpoint)
    return {
        "OpenVINO GenAI ContinuousBatchingPipeline, fp32": lambda: openvino_serve(checkpoint, requests, "f32"),
        "OpenVINO GenAI ContinuousBatchingPipeline, bf16": lambda: openvino_serve(checkpoint, requests, "bf16"),
        "onnxruntime-genai Generator, batches of 8": lambda: onnxruntime_genai_static(checkpoint, requests),
    }


def check_agreement(checkpoint: Path, output_len: int = 16) -> None:
    """Each peer's greedy tokens against transformers' ``generate`` on short prompts."""
    import numpy as np
    import torch
    import transformers

    rng = np.random.default_rng(7)
    prompts = [list(map(int, rng.integers(3, 32000, n))) for n in (23, 9, 17)]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        reference = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                    pad_token_id=0)[0, len(p):].tolist() for p in prompts]

    def show(name: str, got: list[int], want: list[int]) -> None:
        same = sum(a == b for a, b in zip(got, want))
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        print(f"  {name}: {same}/{len(want)} tokens agree with transformers"
              + ("" if first is None else f" (first difference at token {first})"), flush=True)

    print(f"{checkpoint.parent.name} ({_architecture(checkpoint)}), prompts of {[len(p) for p in prompts]} tokens, "
          f"{output_len} greedy tokens; transformers gives {reference[0]} for the first")
    for label, precision in (("OpenVINO GenAI CB fp32", "f32"), ("OpenVINO GenAI CB bf16", "bf16")):
        try:
            for i, prompt in enumerate(prompts):
                show(f"{label}, prompt {i}", openvino_greedy(checkpoint, prompt, output_len, precision), reference[i])
        except Exception as error:
            print(f"  {label}: n/a: {type(error).__name__}: {error}")
    try:
        show("onnxruntime-genai, prompt 0 alone", onnxruntime_genai_greedy(checkpoint, prompts[:1], output_len)[0],
             reference[0])
        for i, got in enumerate(onnxruntime_genai_greedy(checkpoint, prompts, output_len)):
            show(f"onnxruntime-genai, right-padded batch of 3, row {i}", got, reference[i])
    except Exception as error:
        print(f"  onnxruntime-genai: n/a: {type(error).__name__}: {error}")


def make_varied_checkpoint(name: str, folder: Path) -> None:
    """bench_serving's model with 5x larger random weights (initializer_range 0.1): its greedy
    tokens vary instead of repeating one id, a sharper test of agreement."""
    import bench_serving
    import torch
    import transformers

    config_name, model_name, kwargs = bench_serving.MODELS[name]
    config = getattr(transformers, config_name)(tie_word_embeddings=False, initializer_range=0.1, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)


if __name__ == "__main__":
    import argparse
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    import bench_serving

    parser = argparse.ArgumentParser(description="Check the peers' greedy tokens against transformers.")
    parser.add_argument("--models", nargs="+", default=["llama-56M"], choices=list(bench_serving.MODELS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            checkpoint = Path(tmp) / name / "hf"
            bench_serving.make_checkpoint(name, checkpoint)
            check_agreement(checkpoint)
            varied = Path(tmp) / f"{name}, initializer_range 0.1" / "hf"
            make_varied_checkpoint(name, varied)
            check_agreement(varied)
