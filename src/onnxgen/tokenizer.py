"""Text to token ids and back, for a model folder, without transformers.

A folder's ``tokenizer.json`` is read with Hugging Face ``tokenizers``; a SentencePiece
``tokenizer.model`` (Llama, Mistral) with ``sentencepiece``.  Chat templates are the Jinja
templates of ``tokenizer_config.json`` (or ``chat_template.jinja``), rendered the way
transformers renders them.  ``Detokenizer`` turns a growing list of ids into text deltas for
streaming, never cutting a character in half.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if (self.folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(self.folder / "tokenizer.json"))
            self._sp = None
        elif (self.folder / "tokenizer.model").exists():
            import sentencepiece

            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.folder / "tokenizer.model"))
        else:
            raise FileNotFoundError(f"{self.folder} has no tokenizer.json or tokenizer.model")
        self.bos_token = _content(self.config.get("bos_token"))
        self.eos_token = _content(self.config.get("eos_token"))
        if self._sp is not None:
            self.bos_token = self.bos_token or self._sp.id_to_piece(self._sp.bos_id())
            self.eos_token = self.eos_token or self._sp.id_to_piece(self._sp.eos_id())

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size() if self._hf else self._sp.vocab_size()

    def token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self._hf:
            return self._hf.token_to_id(token)
        index = self._sp.piece_to_id(token)
        return None if index == self._sp.unk_id() and token != self._sp.id_to_piece(index) else index

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        """SentencePiece's control tokens by text, so that ``<s>`` in a chat template is one id."""
        pieces = {}
        for index in range(self._sp.vocab_size()):
            if self._sp.is_control(index) or self._sp.is_unknown(index):
                pieces[self._sp.id_to_piece(index)] = index
        return pieces

    # -- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._hf:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = [self._sp.bos_id()] if add_special_tokens and self.config.get("add_bos_token", True) else []
        specials = self._special_ids
        pattern = "(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")"
        for part in re.split(pattern, text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._hf:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if not skip_special_tokens:
            return self._sp.decode_pieces([self._sp.id_to_piece(i) for i in ids])
        return self._sp.decode([i for i in ids if not self._sp.is_control(i)])

    # -- chat ---------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        template_file = self.folder / "chat_template.jinja"
        if template_file.exists():
            return template_file.read_text()
        return self.config.get("chat_template")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}]), as transformers renders it."""
        template = self.chat_template
        if template is None:
            raise ValueError(f"the tokenizer in {self.folder} has no chat template: pass a plain prompt")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        specials = {k: _content(v) for k, v in self.config.items() if k.endswith("_token")}
        specials.update(bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    **specials)
        except TemplateError as error:
            raise ValueError(f"chat template: {error}") from error

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class Detokenizer:
    """Text deltas of a sequence's output ids (vLLM's method: decode a short window before the new
    ids too, so word-boundary spaces come out right; hold back text that ends in half a character)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.read = len(self.ids)
        self.prefix = max(0, self.read - 6)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
