"""Chat templates: how a SCoRe episode is laid out in each model family's turn format.

An episode is  x1 = first_prompt(problem);  y1;  between_turns(correction);  y2  (...).
The model ends each attempt by emitting one of ``stop_pieces`` (its end-of-turn token), which
is part of the attempt; ``between_turns`` is everything after that token up to and including
the opener of the next model turn, so the sampler appends its ids right after the attempt.

Every field is text; ids come from the tokenizer (``encode_prompt``, ``instruction_ids``,
``response_ids``, ``stop_ids``). Each of the template's ``special_pieces`` and ``stop_pieces``
inside a marker (e.g. ``<start_of_turn>`` in ``"<start_of_turn>user\\n"``) becomes its single
id; a special piece the tokenizer does not hold as one token is an error, never silently
spelled out. The text between two special pieces (marker text and the user's text together)
is encoded as one string, as a Hugging Face tokenizer encodes a whole rendered conversation,
so a prompt gets the same ids as ``tokenizer.encode(apply_chat_template(...))``. Each function's text begins and ends at a
special piece or at the prompt/answer boundary, where the sampler joins ids anyway, so
``encode_prompt + y1 + instruction_ids + y2`` are the ids of the whole episode and the
learner re-scores exactly the ids that were sampled.

The family templates reproduce the official Hugging Face chat templates (tested against
``transformers``' ``apply_chat_template``) for conversations without tools or images:

  gemma     Gemma 1-3. ``<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n``;
            messages are stripped (the template's ``| trim``).
  llama3    Llama 3.0 Instruct. ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n
            {text}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``; stripped.
  llama3.1  Llama 3.1-3.3 Instruct: llama3 after the system header these templates always write
            ("Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024", 3.1's default
            date; 3.2/3.3 write today's date, so pin one with ``dataclasses.replace``).
  chatml    Qwen 2 / 2.5. ``<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``, no bos,
            not stripped. Qwen2.5's template writes its default system prompt when the
            conversation has none, and SCoRe conversations have none, so ``system`` holds it by
            default (Qwen2's own was "You are a helpful assistant."; replace it for Qwen2).
  qwen3     Qwen 3: chatml without a default system prompt, in thinking mode (the official
            default; the model writes its own ``<think>...</think>``). The official template
            also drops the thinking of earlier attempts from the history and writes an empty
            think block into a finished conversation's last answer; SCoRe keeps the sampled ids
            in one KV cache, so here every attempt stays as the model wrote it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from score_jax import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One family's turn format (all fields are literal text).

    ``model_end`` must be one of ``stop_pieces``; every stop piece and every special piece is
    one token of the family's tokenizer. ``bos_text`` is only how the tokenizer's bos id appears
    in rendered text (``render_episode``); the id itself is always ``tok.bos_id``.
    """

    name: str
    user_start: str  # opens a user turn
    user_end: str  # closes a user turn
    model_start: str  # opens a model turn; the model's text follows directly
    model_end: str  # what the model emits to close its turn (a stop piece)
    after_model_end: str = ""  # what the template writes after model_end, before the next turn
    stop_pieces: tuple[str, ...] = ()  # pieces that end a model turn
    bos: bool = True  # the first turn starts with the tokenizer's bos id
    bos_text: str = ""  # the bos id's text in a rendered episode ("" if it decodes to nothing)
    special_pieces: tuple[str, ...] = ()  # pieces inside markers that must be single tokens
    system: str = ""  # system prompt written before the first user turn ("": no system turn)
    system_start: str = ""  # opens the system turn
    system_end: str = ""  # closes the system turn
    strip_text: bool = False  # strip whitespace around user and model texts (jinja ``| trim``)

    def __post_init__(self):
        if self.model_end not in self.stop_pieces:
            raise ValueError(f"Chat template {self.name!r}: model_end {self.model_end!r} must be one of "
                             f"stop_pieces {self.stop_pieces}; add it.")
        if self.bos_text and not self.bos:
            raise ValueError(f"Chat template {self.name!r} writes bos_text {self.bos_text!r} but has "
                             "bos=False; set bos=True or drop bos_text.")
        if self.system and not self.system_start:
            raise ValueError(f"Chat template {self.name!r} has a system prompt but no system_start; "
                             "set system_start (and system_end) or drop the system prompt.")

    def _text(self, text: str) -> str:
        return text.strip() if self.strip_text else text

    def _system_turn(self) -> str:
        return f"{self.system_start}{self.system}{self.system_end}" if self.system else ""

    def first_prompt(self, user_text: str) -> str:
        """The text of x1 (without bos): system turn if any, user turn, then the model-turn opener."""
        return f"{self._system_turn()}{self.user_start}{self._text(user_text)}{self.user_end}{self.model_start}"

    def between_turns(self, user_text: str) -> str:
        """Text after a model turn's stop piece through the next model-turn opener."""
        return f"{self.after_model_end}{self.user_start}{self._text(user_text)}{self.user_end}{self.model_start}"

    def response(self, text: str) -> str:
        """A complete model turn's text as the model should write it (SFT targets)."""
        return f"{self._text(text)}{self.model_end}"


# The toy task's template (score_jax.data.toy trains its tokenizer with ``TOY.special_pieces`` as
# single, unsplittable pieces, in this order): ``<user>{prompt}<eot><model>{response}<eot>``.
_TOY_USER, _TOY_MODEL, _TOY_END = "<user>", "<model>", "<eot>"
TOY = ChatTemplate(name="toy", user_start=_TOY_USER, user_end=_TOY_END, model_start=_TOY_MODEL,
                   model_end=_TOY_END, stop_pieces=(_TOY_END,), special_pieces=(_TOY_USER, _TOY_MODEL, _TOY_END))

GEMMA = ChatTemplate(
    name="gemma",
    user_start="<start_of_turn>user\n", user_end="<end_of_turn>\n",
    model_start="<start_of_turn>model\n", model_end="<end_of_turn>", after_model_end="\n",
    stop_pieces=("<end_of_turn>", "<eos>"), special_pieces=("<start_of_turn>", "<end_of_turn>"),
    bos=True, bos_text="<bos>", strip_text=True,
)

LLAMA3 = ChatTemplate(
    name="llama3",
    user_start="<|start_header_id|>user<|end_header_id|>\n\n", user_end="<|eot_id|>",
    model_start="<|start_header_id|>assistant<|end_header_id|>\n\n", model_end="<|eot_id|>",
    stop_pieces=("<|eot_id|>", "<|end_of_text|>"),
    special_pieces=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos=True, bos_text="<|begin_of_text|>", strip_text=True,
)

LLAMA3_1 = dataclasses.replace(
    LLAMA3, name="llama3.1",
    system="Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    system_start="<|start_header_id|>system<|end_header_id|>\n\n", system_end="<|eot_id|>",
)

CHATML = ChatTemplate(
    name="chatml",
    user_start="<|im_start|>user\n", user_end="<|im_end|>\n",
    model_start="<|im_start|>assistant\n", model_end="<|im_end|>", after_model_end="\n",
    stop_pieces=("<|im_end|>", "<|endoftext|>"), special_pieces=("<|im_start|>", "<|im_end|>"),
    bos=False,
    system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    system_start="<|im_start|>system\n", system_end="<|im_end|>\n",
)

QWEN3 = dataclasses.replace(CHATML, name="qwen3", system="")

TEMPLATES = {t.name: t for t in (TOY, GEMMA, LLAMA3, LLAMA3_1, CHATML, QWEN3)}

# Hugging Face config.json `model_type` -> template name. "llama" also covers Llama 2, whose
# [INST] format is not here, and Llama 3.1+, whose official template is "llama3.1".
MODEL_TYPES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma",
    "llama": "llama3",
    "qwen2": "chatml",
    "qwen3": "qwen3", "qwen3_moe": "qwen3",
}


def get(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"Unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}.")
    return TEMPLATES[name]


def default_for(model_type: str) -> str:
    """The template name for a Hugging Face ``model_type`` (config.json), e.g. "qwen2" -> "chatml"."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"No chat template is known for model_type {model_type!r}; set the template "
                         f"explicitly to one of {sorted(TEMPLATES)}.")
    return MODEL_TYPES[model_type]


def _piece_id(tok: tokenizer_lib.Tokenizer, template: ChatTemplate, piece: str) -> int:
    try:
        return tok.token_id(piece)
    except KeyError:
        raise KeyError(f"Chat template {template.name!r} needs {piece!r} as one token, which the tokenizer "
                       "lacks; use the template of the checkpoint's family (chat.default_for).") from None


def _encode_segments(tok: tokenizer_lib.Tokenizer, template: ChatTemplate,
                     segments: Sequence[tuple[str, bool]]) -> list[int]:
    """Ids of the concatenated ``segments`` ((text, is_marker) pairs).

    Each special or stop piece inside a marker becomes its single id; the text between two
    such pieces, across segments, is encoded as one string. User and model texts are never
    searched for special pieces here (a tokenizer.json still matches its special tokens in them).
    """
    specials = sorted({*template.special_pieces, *template.stop_pieces}, key=len, reverse=True)
    split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
    ids: list[int] = []
    text_run: list[str] = []
    for text, is_marker in segments:
        for part in (split.split(text) if is_marker and split else [text]):
            if is_marker and part in specials:
                if text_run:
                    ids.extend(tok.encode("".join(text_run)))
                    text_run = []
                ids.append(_piece_id(tok, template, part))
            elif part:
                text_run.append(part)
    if text_run:
        ids.extend(tok.encode("".join(text_run)))
    return ids


def encode_prompt(tok: tokenizer_lib.Tokenizer, template: ChatTemplate, user_text: str) -> list[int]:
    """Ids of x1: [bos] + system turn (if any) + user turn + model opener (text: first_prompt)."""
    ids = [tok.bos_id] if template.bos else []
    system = ((template.system_start, True), (template.system, False), (template.system_end, True))
    return ids + _encode_segments(tok, template, (
        *(system if template.system else ()),
        (template.user_start, True), (template._text(user_text), False), (template.user_end, True),
        (template.model_start, True)))


def instruction_ids(tok: tokenizer_lib.Tokenizer, template: ChatTemplate, correction: str) -> list[int]:
    """Ids appended after each attempt's stop token: the correction turn and the model opener."""
    return _encode_segments(tok, template, (
        (template.after_model_end, True), (template.user_start, True), (template._text(correction), False),
        (template.user_end, True), (template.model_start, True)))


def response_ids(tok: tokenizer_lib.Tokenizer, template: ChatTemplate, text: str) -> list[int]:
    """Ids of a complete model turn: its text, then the model's end-of-turn piece."""
    return _encode_segments(tok, template, ((template._text(text), False), (template.model_end, True)))


def stop_ids(tok: tokenizer_lib.Tokenizer, template: ChatTemplate) -> tuple[int, ...]:
    """Ids that end a model turn, the end-of-turn id first (for the families, then the
    end-of-text id: the eos ids their generation_config.json declares). Raises KeyError if the
    tokenizer lacks a stop piece (the template does not belong to the checkpoint)."""
    ids = []
    for piece in template.stop_pieces:
        try:
            ids.append(tok.token_id(piece))
        except KeyError:
            raise KeyError(f"Chat template {template.name!r} ends model turns with {piece!r}, which is not "
                           "one token of this tokenizer; use the template of the checkpoint's family "
                           "(chat.default_for).") from None
    return tuple(ids)


def render_episode(template: ChatTemplate, problem: str, attempts: Sequence[str], correction: str) -> str:
    """The text of an N-attempt episode: bos, x1, attempt 1 and its stop piece, the correction
    turn, attempt 2, ..., ending with the last attempt's stop piece (no attempts: bos + x1).

    With a tokenizer.json it is exactly the decoded ``encode_prompt + response_ids(y1) +
    instruction_ids + response_ids(y2) ...``; the official template's rendering of the finished
    conversation adds ``template.after_model_end``.
    """
    parts = [template.bos_text, template.first_prompt(problem)]
    for t, attempt in enumerate(attempts):
        if t:
            parts.append(template.between_turns(correction))
        parts.append(template.response(attempt))
    return "".join(parts)
