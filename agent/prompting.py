"""Prompt and observation turns as token ids (Qwen2.5-VL chat format; docs/method.md §2).

Every piece is encoded separately and concatenated, so the boundaries of images, prompt and
observations are exact and nothing is ever re-tokenised (docs/design.md decision 2). Tool results go
into a **user** turn: Qwen's chat templates drop images inside ``tool``-role messages.

Only the template's own control tokens (``<|im_start|>``, ``<|im_end|>``, tags, the image runs)
become special-token ids. Every other text (tool schemas, the question, observations, errors
that echo model text) is encoded with special tokens disabled, so a model that writes the text
``<|image_pad|>`` and has it echoed back gets ordinary tokens, not an image slot (issue 16).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agent.tools import BUILTIN_TOOLS, get_tool

SYSTEM_TEXT = "You are a helpful assistant. Look at the images and answer the question."
FORMAT_WITH_TOOLS = (
    "Think step by step inside <think> </think>, then either call one tool inside "
    "<tool_call> </tool_call> or give the final answer inside <answer> </answer>."
)
SLOT = "\x00slot\x00"  # where PromptBuilder.encode_template puts untrusted text
FORMAT_NO_TOOLS = "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>."


def system_text(tools: tuple[str, ...]) -> str:
    """The system turn: Qwen2.5's ``# Tools`` / ``<tools>`` block listing ``tools``' schemas.

    Args:
        tools: registered tool names (:func:`agent.tools.register`); each one's ``schema`` is
            one ``json.dumps`` line.

    Raises:
        ValueError: an unregistered name.
    """
    text = SYSTEM_TEXT
    if tools:
        listed = "\n".join(json.dumps(get_tool(t).schema) for t in tools)
        text += f"\n\n# Tools\n<tools>\n{listed}\n</tools>"
    return f"<|im_start|>system\n{text}<|im_end|>\n"


def corpus() -> list[str]:
    """Texts of relook's prompt language (system turns, format lines, observations), e.g. to
    train a compact tokenizer on."""
    return [
        system_text(BUILTIN_TOOLS),
        system_text(()),
        FORMAT_WITH_TOOLS,
        FORMAT_NO_TOOLS,
        "<tool_response>\nHere are the images again: Image 1, Image 2.\nImage 1 (reflect): </tool_response>",
        "<tool_response>\nHere is the zoomed region of Image 2.\nImage 2 (confirm): </tool_response>",
    ]


@dataclass(frozen=True)
class ChatIds:
    """Token ids of the chat and vision special tokens of one tokenizer."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int

    @property
    def vision(self) -> tuple[int, int, int]:
        """``(vision_start, vision_end, image_pad)``, as :func:`agent.trajectory.image_token_problem`
        takes them."""
        return self.vision_start, self.vision_end, self.image_pad

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatIds:
        """Look the ids up; raises ``ValueError`` naming a token the tokenizer lacks."""
        names = {
            "im_start": "<|im_start|>",
            "im_end": "<|im_end|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "image_pad": "<|image_pad|>",
        }
        ids = {}
        for field_name, tok in names.items():
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(
                    f"tokenizer has no {tok} token: not a Qwen2-VL/Qwen2.5-VL tokenizer"
                )
            ids[field_name] = tid
        return cls(**ids)


class PromptBuilder:
    """Encodes the initial prompt and observation turns of the agent as token ids.

    Args:
        tokenizer: the policy's tokenizer.
        tools: tools advertised in the system turn (``()`` for the ``tools=none`` arm).
    """

    def __init__(self, tokenizer, tools: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.tools = tools
        self.ids = ChatIds.from_tokenizer(tokenizer)
        added = sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len)
        self._controls = re.compile("(" + "|".join(map(re.escape, reversed(added))) + ")")

    def encode(self, text: str) -> list[int]:
        """Encode plain text with special tokens disabled (without BOS/EOS).

        Args:
            text: any text, model-written included.

        Returns:
            Ids in which special-token text such as ``<|image_pad|>`` is ordinary tokens
            (``split_special_tokens``); for text without such substrings, the ids of a plain
            ``encode``.
        """
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]

    def encode_template(self, template: str, *fills: str) -> list[int]:
        """Encode ``template``: its added-token strings as their ids, the rest as plain text.

        Each ``SLOT`` in ``template`` takes the next of ``fills`` (untrusted text) before
        encoding, so a fill joins the text around it exactly as in one string, but any
        special-token text in it stays ordinary tokens. The tokenizer splits at added tokens
        anyway, so for fills without special-token text the ids equal ``tokenizer.encode`` of
        the filled string.

        Args:
            template: relook's own text with its control tokens written out.
            fills: one string per ``SLOT``, in order.

        Returns:
            Token ids.

        Raises:
            ValueError: the number of fills differs from the number of slots.
        """
        if template.count(SLOT) != len(fills):
            raise ValueError(f"{template.count(SLOT)} slots but {len(fills)} fills")
        rest = iter(fills)
        ids: list[int] = []
        for k, part in enumerate(self._controls.split(template)):
            if k % 2:  # the split's captured group: a control token of the template
                ids.append(self.tokenizer.convert_tokens_to_ids(part))
            elif part:
                ids += self.encode(re.sub(re.escape(SLOT), lambda _: next(rest), part))
        return ids

    def image_ids(self, n_tokens: int) -> list[int]:
        """``<|vision_start|>`` + ``<|image_pad|>`` x ``n_tokens`` + ``<|vision_end|>``."""
        return [self.ids.vision_start] + [self.ids.image_pad] * n_tokens + [self.ids.vision_end]

    def system_text(self) -> str:
        """The system turn (with the tool list when tools are advertised)."""
        return system_text(self.tools)

    def prompt(self, question: str, image_tokens: list[int]) -> list[int]:
        """Initial prompt: system turn, user turn ``Image k: <image>`` ..., question, format.

        Args:
            question: the question text (encoded with special tokens disabled).
            image_tokens: image tokens per input image (``t*h*w / merge**2``).

        Returns:
            Token ids ending with the ``<|im_start|>assistant\\n`` header.
        """
        ids = self.encode_template(self.system_text() + "<|im_start|>user\n")
        for k, n in enumerate(image_tokens, start=1):
            ids += self.encode(f"Image {k}: ") + self.image_ids(n) + self.encode("\n")
        fmt = FORMAT_WITH_TOOLS if self.tools else FORMAT_NO_TOOLS
        tail = f"{SLOT}\n{fmt}<|im_end|>\n<|im_start|>assistant\n"
        return ids + self.encode_template(tail, question)

    def observation(self, text: str, images: list[tuple[str, int]], close_turn: bool) -> list[int]:
        """A tool observation as a new user turn, then the next assistant header.

        Args:
            text: observation text (``"Error: ..."`` for a failed call); may echo model text,
                so it is encoded with special tokens disabled.
            images: ``(label, n_tokens)`` per returned image.
            close_turn: also emit ``<|im_end|>`` first (the policy's turn was cut before it).
        """
        head = ("<|im_end|>" if close_turn else "") + "\n<|im_start|>user\n<tool_response>\n" + SLOT
        ids = self.encode_template(head, text)
        for label, n in images:
            ids += self.encode(f"\n{label}: ") + self.image_ids(n)
        ids += self.encode_template("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
        return ids
