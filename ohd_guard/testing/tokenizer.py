"""The tiny tokenizer every tiny model shares: a word-level vocabulary trained offline in milliseconds, the
special tokens the processors read, and a ChatML-like chat template."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_WORDS = """
the a an and or but if then else when while for to of in on at by with from as is are was were be
been being have has had do does did not no yes all any some many much more most few less this that
these those it its he she they we you i me him her them us my your our their what which who whom
whose why how where there here can could will would shall should may might must about above after
again against before below between both during each further into just like near off once only other
out over own same so than too under until up very well also back even still way because through
user assistant system tool hello hi please thanks thank sorry okay sure help tell explain describe
write make build create find show give get take use need want know think see look say said go come
work call try ask answer
question story poem code list steps guide recipe picture image photo text word sentence paragraph
page book letter email message chat model assistant user system human person people friend family
child man woman teacher doctor student day night time year today tomorrow morning home house school
city country world water food fire light color red green blue black white small big large long short
old new good bad best better safe unsafe harmful dangerous legal illegal weapon bomb drug poison hack
steal attack kill hurt money bank card password account computer phone car cat dog bird tree flower
sun moon star sky sea river mountain road street music song game movie art science math history
cook bake clean learn teach read play run walk eat drink sleep open close start stop turn keep hold
first second third one two three four five six seven eight nine ten hundred thousand number zero
""".split()
_CORPUS_EXTRA = "0 1 2 3 4 5 6 7 8 9 10 42 100 2024 . , ! ? ; : ' \" ( ) [ ] { } - _ / \\ * + = % & # @ $ ~ < >"

#: Tokens every tiny tokenizer carries, whatever the architecture, so one vocabulary serves all.
_SPECIAL = [
    "<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
    "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
    "<start_of_image>", "<image_soft_token>", "<end_of_image>",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
    "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE_GLOBAL", "TILE",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]  # fmt: skip


@functools.lru_cache(maxsize=8)
def _tokenizer_json(extra_words: tuple[str, ...] = ()) -> str:
    """Train a byte-level BPE once (milliseconds): byte fallback means no text is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1600,
        min_frequency=1,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _WORDS + list(extra_words) * 50
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    # Every word also at a line start (no leading space), as after "<|im_start|>user\n".
    lines += [f"{w}\n{w.capitalize()} {w}." for w in words] + [_CORPUS_EXTRA] * 5
    tok.train_from_iterator(lines, trainer=trainer)
    return tok.to_str()


def _template(image: str) -> str:
    """A ChatML-like jinja template; ``image`` is what one image content part renders to."""
    return (
        "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or part['type'] == 'image_url' %}" + image + "{% elif part['type'] == 'text' %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def tiny_tokenizer(
    image: str = "<image>", extra_special: dict[str, str] | None = None, extra_words: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A left-padding ``PreTrainedTokenizerFast`` over the shared tiny vocabulary.

    ``extra_special`` names tokens the processor reads off the tokenizer (``image_token``,
    ``boi_token``...); ``extra_words`` are trained in as whole tokens (used for the trigger word).
    Like Qwen's, it adds no BOS by itself: the chat template writes ``<s>``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(tuple(extra_words))),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=extra_special or {},
        chat_template=_template(image),
        model_max_length=4096,
    )
    return tok
