"""Build, save and load Qwen2.5-VL policies: the tiny local model and any checkpoint directory.

The tiny model is a real ``transformers`` ``Qwen2_5_VLForConditionalGeneration`` built from a
shrunken ``Qwen2_5_VLConfig`` (docs/gotchas.md), with a compact byte-level BPE tokenizer trained
locally on relook's prompt language and the Qwen2.5-VL special tokens, and the stock PIL
``Qwen2VLImageProcessorPil``. Everything is written with ``save_pretrained`` and read back with
``from_pretrained(path)``, exactly as a real Qwen2.5-VL-3B/7B checkpoint directory is.

Why not the stock ``Qwen2_5_VLProcessor``: it cannot be built without torchvision (its video
processor), which must never be installed on the CPU machines (docs/gotchas.md). relook builds every
prompt from token ids itself (docs/design.md decision 2), so it only needs the tokenizer and the image
processor, loaded side by side by :func:`load_policy` from any Qwen2-VL/Qwen2.5-VL directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from agent.weights import load_weights, write_weight_hashes

# Qwen2.5-VL's special tokens, in the order of the real vocabulary (ids 151643..).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added (non-special) tokens of the Qwen2.5 vocabulary plus relook's turn tags.
TAG_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
)
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# A Qwen2.5-VL-style chat template: images as vision_start/image_pad/vision_end, tools listed in the
# system turn inside <tools></tools>, assistant tool calls as <tool_call>{json}</tool_call>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant."
    "{% if tools %}\n\n# Tools\n<tools>\n{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'system' and tools %}\n\n# Tools\n<tools>\n{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>{% endif %}"
    "{% for call in message.get('tool_calls', []) %}\n<tool_call>\n{{ call | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The language the tiny tokenizer is trained on: relook's prompt, tool and task vocabulary.
_CORPUS_WORDS = (
    "You are a helpful assistant. Look at the images and answer the question. "
    "Image 1: Image 2: Image 3: Image 4: Image 5: Image 6: "
    "Think step by step inside <think> </think>, then either call one tool inside "
    "<tool_call> </tool_call> or give the final answer inside <answer> </answer>. "
    '{"name": "reflect", "arguments": {"images": [1, 2, 3, 4]}} '
    '{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [10, 20, 30, 40]}} '
    "reflect: look at the original images again. confirm: zoom into a box of one image. "
    "Here are the images again. Here is the zoomed region of image. Error: invalid tool call "
    "unknown tool bad JSON image index out of range box is empty inverted too small aspect "
    "Which image contains the red green blue yellow white black orange purple pink cyan "
    "square circle triangle star cross digit number letter word object shape "
    "How many images contain a? What digit is written in image? Which image has the largest "
    "smallest most fewest? Which image is different from the others? same different yes no "
    "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 "
    "the a an of in on at is are there I see it looks like maybe so answer final "
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Qwen2.5-VL built from scratch (docs/gotchas.md "Tiny Qwen2.5-VL built locally").

    Attributes:
        text_layers: decoder layers.
        hidden: text hidden size (channels).
        heads: query heads; ``hidden / heads`` is the head dim.
        kv_heads: key/value heads (grouped-query attention when < ``heads``).
        intermediate: text MLP width.
        vision_depth: vision transformer blocks.
        vision_hidden: vision hidden size.
        vision_heads: vision attention heads.
        patch_size: vision patch edge in pixels.
        merge_size: spatial merge factor (``merge_size**2`` patches make one image token).
        vision_window: Qwen2.5-VL vision window attention size in pixels (``window_size``);
            every block but the last attends within windows of this side. Qwen2.5-VL uses 112;
            56 (the tests' default) cuts a 112 px image into 2 x 2-token windows. Measured
            (tower + linear head, flat backgrounds): window 56 at lr 1e-3 stayed at chance on
            shapes and digits for 1,500 steps; window 112 at lr 3e-4 reached 0.94 shapes and
            0.34 digits (lr and window were not separated).
        vocab_size: target BPE vocabulary size (tokens), special and tag tokens included.
        max_pixels: image processor's pixel cap per image (pixels, h*w); bounds tokens per image.
        min_pixels: image processor's pixel floor per image.
    """

    text_layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_depth: int = 2
    vision_hidden: int = 64
    vision_heads: int = 2
    patch_size: int = 14
    merge_size: int = 2
    vision_window: int = 56
    vocab_size: int = 1024
    max_pixels: int = 112 * 112
    min_pixels: int = 56 * 56

    def __post_init__(self) -> None:
        head_dim = self.hidden // self.heads
        if self.hidden % self.heads or head_dim % 4:
            raise ValueError(
                f"TinySpec.hidden={self.hidden} must split into heads={self.heads} of a dim divisible by 4"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"TinySpec.kv_heads={self.kv_heads} must divide heads={self.heads}")
        unit = self.patch_size * self.merge_size
        if self.vision_window < unit or self.vision_window % unit:
            raise ValueError(
                f"TinySpec.vision_window={self.vision_window} must be a positive multiple of "
                f"patch_size * merge_size = {unit} pixels"
            )
        if self.vision_hidden % self.vision_heads:
            raise ValueError(
                f"TinySpec.vision_hidden={self.vision_hidden} not divisible by vision_heads"
            )


def _prompt_corpus() -> list[str]:
    """relook's prompt, question and answer language (agent prompting, tasks, pretraining)."""
    from agent.data.pretrain import THOUGHTS
    from agent.data.render import COLOURS, SHAPES
    from agent.data.tasks import QUESTIONS
    from agent.prompting import corpus

    texts = corpus() + list(THOUGHTS)
    for c in COLOURS:
        for s in SHAPES:
            texts += [q.format(colour=c, shape=s, article="a", k=2) for q in QUESTIONS.values()]
            texts += [
                f"Is there a {c} {s} in the image? Image 2 shows a {c} {s}. The zoomed region shows a {c} {s}."
            ]
    texts += [" ".join(f"[{i}, {i + 7}, {i + 30}, {i + 61}]" for i in range(0, 224))]
    texts += [
        "What colour is the shape? What shape is in the image? What digit is written in the image?"
    ]
    texts += [
        "What does image 3 show? Zoom in and describe the object in image 1. Look at image 2 again and describe it."
    ]
    return texts


def build_tokenizer(
    vocab_size: int = 1024, corpus: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Train a compact byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template.

    Byte-level, so any text encodes; the BPE merges are learned from relook's prompt language
    (``_CORPUS_WORDS``) plus ``corpus``. Deterministic for a fixed corpus.

    Args:
        vocab_size: total vocabulary size in tokens (special tokens included).
        corpus: extra training texts (e.g. generated questions).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token='<|im_end|>'``, ``pad_token='<|endoftext|>'``
        and :data:`CHAT_TEMPLATE`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(QWEN_SPECIAL_TOKENS) + list(TAG_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [_CORPUS_WORDS] * 4 + _prompt_corpus() * 8 + list(corpus)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[3:]),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor(spec: TinySpec) -> Qwen2VLImageProcessorPil:
    """The stock PIL Qwen2-VL image processor with the tiny model's patch, merge and pixel caps."""
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=2,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
    )


TINY_FAMILIES = ("qwen2_5_vl", "qwen2_vl")


def tiny_config(
    spec: TinySpec, tokenizer: PreTrainedTokenizerFast, family: str = "qwen2_5_vl"
) -> Qwen2_5_VLConfig | Qwen2VLConfig:
    """A config of ``spec``'s shape whose special-token ids point into ``tokenizer``.

    Args:
        spec: the shape.
        tokenizer: the tokenizer (vocabulary size, special-token ids).
        family: ``"qwen2_5_vl"`` (``Qwen2_5_VLConfig``: windowed vision attention, RMSNorm,
            SwiGLU vision MLP) or ``"qwen2_vl"`` (``Qwen2VLConfig``: full vision attention,
            LayerNorm, GELU MLP); the language model is the same Qwen2 decoder with M-RoPE.

    Raises:
        ValueError: unknown ``family``.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.hidden // spec.heads
    quarter = head_dim // 4  # mrope_section must sum to head_dim / 2 (docs/gotchas.md)
    mrope = [head_dim // 2 - 2 * quarter, quarter, quarter]
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size,
        out_hidden_size=spec.hidden,
        window_size=spec.vision_window,
        fullatt_block_indexes=[spec.vision_depth - 1],
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=spec.vision_depth,
            embed_dim=spec.vision_hidden,
            hidden_size=spec.hidden,
            mlp_ratio=2,
            num_heads=spec.vision_heads,
            patch_size=spec.patch_size,
            spatial_merge_size=spec.merge_size,
        )
    cls = Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig
    return cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_model(
    out_dir: str | Path, spec: TinySpec | None = None, seed: int = 0, family: str = "qwen2_5_vl"
) -> Path:
    """Build a random-weight tiny Qwen2.5-VL (or Qwen2-VL), its tokenizer and image processor,
    and save them.

    Args:
        out_dir: directory to write (created; existing model files are overwritten).
        spec: model shape; defaults to :class:`TinySpec`.
        seed: torch seed for the weight initialisation.
        family: ``"qwen2_5_vl"`` or ``"qwen2_vl"`` (:func:`tiny_config`).

    Returns:
        ``out_dir`` as a ``Path``, loadable with :func:`load_policy`.
    """
    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    torch.manual_seed(seed)
    config = tiny_config(spec, tokenizer, family)
    cls = (
        Qwen2VLForConditionalGeneration
        if family == "qwen2_vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    model = cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    write_weight_hashes(out)
    tokenizer.save_pretrained(out)
    build_image_processor(spec).save_pretrained(out)
    (out / "relook_tiny_spec.json").write_text(json.dumps({**asdict(spec), "seed": seed}, indent=1))
    return out


def is_vision_parameter(name: str) -> bool:
    """Whether parameter ``name`` (from ``model.named_parameters()``) belongs to the vision tower
    of a Qwen2.5-VL / Qwen2-VL model: anything under a ``visual`` module, the patch merger
    included (transformers names them ``model.visual.*``)."""
    return ".visual." in f".{name}"


@dataclass
class Policy:
    """A loaded VLM with its tokenizer and image processor.

    Attributes:
        model: a ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration``.
        tokenizer: its tokenizer (``eos_token_id`` ends a turn).
        image_processor: a Qwen2-VL image processor (``patch_size``, ``merge_size``).
        path: the directory it was loaded from.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    image_processor: object
    path: str

    @property
    def vision_token_ids(self) -> list[int]:
        """Ids of the four vision special tokens that the policy must never sample (docs/method.md §2)."""
        return [self.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]


SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")

RELOOK_TINY = "relook-tiny"
"""Name of relook's default base model, the committed checkpoint in :data:`RELOOK_TINY_DIR`."""

RELOOK_TINY_DIR = Path(__file__).resolve().parents[1] / "models" / "relook-tiny"
"""``models/relook-tiny`` of the repository: a Qwen2.5-VL pretrained on CPU by
``python -m train.pretrain`` (its ``README.md`` is the model card with the rebuild command)."""


def resolve_model(model: str | Path) -> str:
    """Map the name ``relook-tiny`` to the committed checkpoint; any other value is returned as is.

    Raises:
        FileNotFoundError: ``relook-tiny`` was asked for but ``models/relook-tiny`` is missing
            (for example in a wheel install); the message gives the command that rebuilds it.
    """
    if str(model) != RELOOK_TINY:
        return str(model)
    if not (RELOOK_TINY_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"relook-tiny is not at {RELOOK_TINY_DIR} (it ships with the git repository); "
            "rebuild it with the command in its model card, or pass a checkpoint directory"
        )
    return str(RELOOK_TINY_DIR)


def load_policy(
    path: str | Path,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> Policy:
    """Load a Qwen2.5-VL or Qwen2-VL checkpoint directory (or hub id) with ``from_pretrained``.

    The weights must fit the model exactly (no missing or unexpected tensors,
    :func:`agent.weights.load_weights`), and a folder written by relook, which records the sha256
    of its weight files (:data:`agent.weights.WEIGHT_HASHES`), is checked against that record
    first. Hashing reads the weights once more: milliseconds for relook-tiny (7.6 MB), about
    20 s for a 15 GB 7B checkpoint (sha256 ran at 0.8 GB/s on one CPU core); ``verify=False``
    skips it (file sizes are still checked).

    Args:
        path: local directory holding ``config.json``, weights, tokenizer and
            ``preprocessor_config.json`` (or a hub id for users with network access), or
            ``"relook-tiny"`` for the committed default base model (:func:`resolve_model`).
        attn_implementation: ``"sdpa"`` or ``"eager"`` (any transformers attention backend).
        dtype: parameter dtype.
        verify: check the weight files' sha256 against the folder's record when it has one.

    Returns:
        A :class:`Policy`.

    Raises:
        FileNotFoundError: ``path`` is a local path that does not exist.
        ValueError: the directory lacks a readable config, weights, tokenizer or image processor,
            or holds a model family relook has no support for, or its weights are damaged (sha256
            differs from the record: the message names the file and both hashes) or miss or add
            tensors (the message names them); the message names the path.
    """
    path = resolve_model(path)
    p = Path(path)
    # a hub id is "name" or "owner/name"; anything deeper, or spelled as a path, is a directory
    looks_local = p.exists() or str(path).startswith((".", "/", "~")) or len(p.parts) > 2
    if looks_local and not p.exists():
        raise FileNotFoundError(f"model directory not found: {p}")
    if looks_local and not (p / "config.json").is_file():
        raise ValueError(
            f"model directory {p} has no config.json (is it a save_pretrained folder?)"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:  # not a local directory, and the hub id cannot be resolved
        if looks_local:
            raise ValueError(f"cannot read model config in {path}: {exc}") from exc
        raise FileNotFoundError(
            f"model {path!r} is neither a local directory nor a hub id that can be loaded "
            f"(no network, or no such repository): {exc}"
        ) from exc
    except Exception as exc:  # corrupt json and friends
        raise ValueError(f"cannot read model config in {path}: {exc}") from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model in {path} is '{config.model_type}'; relook supports {SUPPORTED_MODEL_TYPES}"
        )
    stage = "weights"
    try:
        model = load_weights(
            AutoModelForImageTextToText,
            path,
            verify=verify,
            attn_implementation=attn_implementation,
            dtype=dtype,
        )
        stage = "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(path)
        stage = "image processor"
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    except Exception as exc:
        raise ValueError(f"cannot load the {stage} from model directory {path}: {exc}") from exc
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, image_processor=image_processor, path=str(path))
