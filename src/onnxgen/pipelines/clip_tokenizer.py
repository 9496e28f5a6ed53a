"""CLIP's byte-level BPE tokenizer on the ``tokenizers`` library: no torch, no transformers.

A diffusers checkpoint keeps its tokenizer as ``vocab.json`` + ``merges.txt`` (+ an optional
``tokenizer.json``) with ``tokenizer_config.json`` naming the special tokens and the length.  This
builds the same pipeline as transformers' CLIPTokenizer (NFC, whitespace runs to one space,
lower case, CLIP's split pattern, byte-level BPE with ``</w>`` ends, ``<|startoftext|> … <|endoftext|>``)
and pads every prompt to ``model_max_length`` (77) as Stable Diffusion does.

``write_openai_vocab(folder)`` writes the real 49,408-token CLIP vocabulary from the
``bpe_simple_vocab_16e6.txt.gz`` that the ``openai-clip`` package ships (its package imports
torch, so the file is located without importing it).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np

SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (CLIP's vocabulary is written with it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def openai_vocab_file() -> Path:
    """``bpe_simple_vocab_16e6.txt.gz`` from the installed ``openai-clip`` package."""
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.exists():
            return path
    raise FileNotFoundError("CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) was not found: "
                            "install the `openai-clip` package (pip install openai-clip)")


def write_openai_vocab(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write CLIP's tokenizer as a diffusers checkpoint keeps it: vocab.json, merges.txt, configs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(openai_vocab_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
         "errors": "replace", **special}, indent=2))
    return folder


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class CLIPTokenizer:
    """``tokenizer(["a cat", ...])`` -> int64 ids ``[B, model_max_length]``, truncated and padded."""

    def __init__(self, folder: str | Path):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if (folder / "tokenizer.json").exists():
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).exists()]
            if missing:
                raise FileNotFoundError(f"the tokenizer folder {folder} has no {' or '.join(missing)} "
                                        "(nor tokenizer.json)")
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
                      if line and not line.startswith("#version")]
            bos, eos = _content(config.get("bos_token")) or BOS, _content(config.get("eos_token")) or EOS
            unk = _content(config.get("unk_token")) or eos
            tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                      end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
            tokenizer.normalizer = normalizers.Sequence(
                [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False)])
            tokenizer.decoder = decoders.ByteLevel()
            tokenizer.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                                    trim_offsets=False, add_prefix_space=False)
            # Written in a prompt, the special tokens are themselves (as in transformers' CLIPTokenizer).
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((bos, eos, unk))])
            self._tokenizer = tokenizer
        self.model_max_length = int(config.get("model_max_length", 77))
        if self.model_max_length > 10_000:  # transformers' "no limit" sentinel
            self.model_max_length = 77
        pad = _content(config.get("pad_token")) or _content(config.get("eos_token")) or EOS
        self.pad_token_id = self._tokenizer.token_to_id(pad)
        if self.pad_token_id is None:
            raise ValueError(f"the pad token {pad!r} is not in the tokenizer's vocabulary")

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` with the start and end tokens, untruncated."""
        return self._tokenizer.encode(text).ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Ids ``[len(texts), model_max_length]``: longer prompts are truncated (end token kept)."""
        length = self.model_max_length
        ids = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            if len(tokens) > length:
                tokens = tokens[:length - 1] + tokens[-1:]
            ids[row, :len(tokens)] = tokens
        return ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
