"""Data for pre-training: corpora, tokenizers, the token cache and packed batches.

    iter_documents(path)            documents of a corpus (None: the embedded default corpus)
    train_tokenizer(docs)           byte-level BPE with <pad>=0, <bos>=1, <eos>=2
    Tokenizer.load(path)            any tokenizer.json
    prepare_tokens(path, tok, dir)  tokenize once into cached memmaps -> TokenStore
    PackedBatches(store.train, ...) shuffled, rank-sharded, resumable (inputs, labels) batches
    eval_batches(store.heldout,...) held-out batches in a fixed order
"""

from .batches import PackedBatches, eval_batches
from .corpus import SUPPORTED_SUFFIXES, Corpus, Document, embedded_corpus, is_heldout, iter_documents, open_corpus
from .errors import DataError
from .tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from .tokens import TokenStore, default_cache_dir, prepare_tokens, token_dtype
from .util import parse_size

__all__ = [
    "SPECIAL_TOKENS",
    "SUPPORTED_SUFFIXES",
    "Corpus",
    "DataError",
    "Document",
    "PackedBatches",
    "TokenStore",
    "Tokenizer",
    "default_cache_dir",
    "embedded_corpus",
    "eval_batches",
    "is_heldout",
    "iter_documents",
    "open_corpus",
    "parse_size",
    "prepare_tokens",
    "token_dtype",
    "train_tokenizer",
]
