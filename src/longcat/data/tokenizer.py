"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` (tokenizer.json).

Our own tokenizers are byte-level BPE (any UTF-8 text encodes, nothing is ever unknown) with the
special tokens below at fixed ids; `<pad>`, `<bos>` and `<eos>` are 0, 1 and 2, the ModelConfig
defaults. Any other tokenizer.json loads too; its special ids are read from it (and from a
tokenizer_config.json beside it, when there is one).

Text from data is encoded with special tokens *not* recognised: a document that happens to contain
the characters "<eos>" gets the bytes of "<eos>", never the end-of-text id. Only the pipeline
places special ids.

How a prompt starts (`Tokenizer.prompt_prefix`). Training streams are documents each followed by
eos, never a bos (see batches.py), so a model of ours has only ever seen a document start right
after an eos. Our tokenizers record that in their own tokenizer.json, as a post-processor that puts
eos before a sequence: the inference engine reads it, and so does transformers' tokenizer for an
exported model. A Hugging Face checkpoint keeps its own policy: `add_bos_token` in its
tokenizer_config.json, else what its tokenizer.json's post-processor adds (Llama 3 adds
<|begin_of_text|>, GPT-2 adds nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .errors import DataError
from .progress import byte_progress

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
RESERVED_TOKENS = [f"<|reserved_{k}|>" for k in range(8)]  # room for tool calls, fill-in-the-middle, ...
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *CHAT_TOKENS, *RESERVED_TOKENS]  # ids 0, 1, 2, ...

# Names other tokenizers use for the same roles, tried in this order when loading a foreign file.
EOS_NAMES = (EOS_TOKEN, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "<|end|>")
BOS_NAMES = (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|bos|>")
PAD_NAMES = (PAD_TOKEN, "[PAD]", "<|pad|>", "<|padding|>")

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Encode and decode text; knows its vocabulary size and its pad, bos and eos ids.

    bos and pad fall back to the eos id when a foreign tokenizer has no such token (GPT-2 style);
    a tokenizer without an end-of-text token is refused, since documents are separated by it.
    prompt_prefix: the ids a text prompt starts with (see the module docstring).
    """

    def __init__(self, hf: tokenizers.Tokenizer, *, source: str = "tokenizer",
                 config_tokens: dict[str, str] | None = None, add_bos_token: bool | None = None) -> None:
        self.hf = hf
        self.hf.encode_special_tokens = True  # data text never turns into special ids
        self.source = source
        vocab = hf.get_vocab(with_added_tokens=True)
        # Embedding rows needed: one past the largest id (added tokens can leave gaps).
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        config_tokens = config_tokens or {}
        eos = _find_token(vocab, config_tokens.get("eos_token"), EOS_NAMES)
        if eos is None:
            raise DataError(
                f"{source} has no end-of-text token (looked for {', '.join(EOS_NAMES)}); documents are "
                "separated by it. Add one to the tokenizer, or train one with `longcat tokenizer train`")
        self.eos_id: int = eos
        bos = _find_token(vocab, config_tokens.get("bos_token"), BOS_NAMES)
        pad = _find_token(vocab, config_tokens.get("pad_token"), PAD_NAMES)
        self.bos_id: int = eos if bos is None else bos
        self.pad_id: int = eos if pad is None else pad
        self._config_tokens = config_tokens
        if add_bos_token is not None:  # tokenizer_config.json overrides tokenizer.json, as in transformers
            self.prompt_prefix: list[int] = [self.bos_id] if add_bos_token else []
        elif hf.post_processor is not None:
            self.prompt_prefix = _added_before(hf)
        elif [vocab.get(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS))):
            # ours, trained before the policy was written into tokenizer.json: training documents
            # start after an eos all the same
            self.prompt_prefix = [self.eos_id]
        else:
            self.prompt_prefix = []

    # --- files ------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer.json file, or a folder that holds one (also reads tokenizer_config.json
        beside it for the names of the special tokens, as Hugging Face model folders have)."""
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(f"tokenizer {file} does not exist; pass a tokenizer.json file or a folder holding one, "
                            "or train one with `longcat tokenizer train`")
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except PermissionError as exc:
            raise DataError(f"cannot read tokenizer {file}: permission denied") from exc
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{file} is not a valid tokenizer.json: {exc}") from exc
        config = _read_tokenizer_config(file.parent / "tokenizer_config.json")
        add_bos = config.pop("add_bos_token", None)
        return cls(hf, source=str(file), config_tokens=config, add_bos_token=add_bos)

    @classmethod
    def from_json(cls, text: str, *, source: str = "tokenizer") -> "Tokenizer":
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:
            raise DataError(f"{source} is not a valid tokenizer.json: {exc}") from exc
        return cls(hf, source=source)

    def to_json(self) -> str:
        return self.hf.to_str()

    def for_training(self) -> "Tokenizer":
        """This tokenizer with eos recorded as the start of every prompt: what a model trained on
        our packed streams (documents separated by eos, no bos) saw before each document. Training
        saves this one with its checkpoints, so a foreign tokenizer's bos policy (e.g. Llama 3's)
        does not reach a model that never saw that token. Encoding data is unaffected."""
        hf = tokenizers.Tokenizer.from_str(self.to_json())
        hf.post_processor = _document_start(self.id_to_token(self.eos_id), self.eos_id)
        return Tokenizer(hf, source=self.source, config_tokens=self._config_tokens)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json to path (a .json file name, or a folder). Written atomically."""
        target = Path(path).expanduser()
        if target.suffix != ".json":
            target = target / TOKENIZER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            temp.write_text(self.to_json(), encoding="utf-8")
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return target

    @property
    def sha256(self) -> str:
        """Hash of what decides the ids of data text, part of every token cache key: tokenizer.json
        without its post-processor. That only adds a prompt's special tokens, and data is encoded
        without them, so `for_training()` leaves the key, and the cached tokens, as they were."""
        hf = tokenizers.Tokenizer.from_str(self.to_json())
        hf.post_processor = None
        return hashlib.sha256(hf.to_str().encode("utf-8")).hexdigest()

    # --- encoding -----------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of text, with no special tokens added. allow_special=True turns special-token
        strings in text (e.g. "<|im_start|>") into their ids, for chat templates."""
        if not allow_special:
            return self.hf.encode(text, add_special_tokens=False).ids
        self.hf.encode_special_tokens = False
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        finally:
            self.hf.encode_special_tokens = True

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts at once; tokenizers spreads the work over threads (no processes)."""
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use.
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, source={self.source!r})")


def train_tokenizer(documents: Iterable[str], vocab_size: int = 8192, *, show_progress: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer with SPECIAL_TOKENS at ids 0, 1, 2, ...

    vocab_size counts everything: the specials, the 256 byte tokens and the merges. A corpus too
    small to fill it gives a smaller vocabulary (read Tokenizer.vocab_size).
    """
    smallest = len(SPECIAL_TOKENS) + 256 + 1
    if vocab_size < smallest:
        raise DataError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {smallest} "
                        f"({len(SPECIAL_TOKENS)} special tokens, 256 bytes and one merge)")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = _document_start(EOS_TOKEN, SPECIAL_TOKENS.index(EOS_TOKEN))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars would fight ours; ours says when it computes the merges
    )
    counts = {"docs": 0}
    with byte_progress("reading", None, enabled=show_progress) as bar:
        hf.train_from_iterator(_counted(documents, counts, bar), trainer)
        bar.update(0, info=f"{counts['docs']:,} documents; {hf.get_vocab_size(with_added_tokens=True):,} tokens")
    if counts["docs"] == 0:
        raise DataError("no documents to train the tokenizer on")
    tokenizer = Tokenizer(hf, source="trained tokenizer")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, (token, tokenizer.token_to_id(token))
    return tokenizer


def _counted(documents: Iterable[str], counts: dict, bar) -> Iterator[str]:
    for text in documents:
        counts["docs"] += 1
        bar.update(len(text.encode("utf-8")), info=f"{counts['docs']:,} documents")
        yield text
    bar.update(0, info=f"{counts['docs']:,} documents; computing merges")


def _document_start(eos_token: str, eos_id: int) -> processors.TemplateProcessing:
    """A post-processor that puts eos before each sequence, as documents sit in a training stream."""
    return processors.TemplateProcessing(single=f"{eos_token} $A", pair=f"{eos_token} $A {eos_token} $B:1",
                                         special_tokens=[(eos_token, eos_id)])


def _added_before(hf: tokenizers.Tokenizer) -> list[int]:
    """The ids hf's post-processor puts before a single sequence."""
    probe = "a"
    plain = hf.encode(probe, add_special_tokens=False).ids
    full = hf.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def _find_token(vocab: dict[str, int], configured: str | None, names: tuple[str, ...]) -> int | None:
    if configured is not None and configured in vocab:
        return vocab[configured]
    for name in names:
        if name in vocab:
            return vocab[name]
    return None


def _read_tokenizer_config(path: Path) -> dict[str, str | bool]:
    """{"eos_token": "...", "add_bos_token": bool, ...} from a Hugging Face tokenizer_config.json;
    {} when absent or odd."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    found: dict[str, str | bool] = {}
    for role in ("eos_token", "bos_token", "pad_token"):
        value = config.get(role)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[role] = value
    if isinstance(config.get("add_bos_token"), bool):
        found["add_bos_token"] = config["add_bos_token"]
    return found
