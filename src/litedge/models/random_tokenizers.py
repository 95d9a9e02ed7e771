"""Synthetic tokenizers with the real vocabularies' sizes and special ids, built without downloads.

- :func:`t5_tokenizer`: a T5 Unigram tokenizer laid out like T5-v1.1's (``<pad>`` 0, ``</s>`` 1,
  ``<unk>`` 2, 31,997 pieces, then ``<extra_id_99>`` .. ``<extra_id_0>`` at 32000..32099: 32,100
  tokens, below the encoder's 32,128 embedding rows as in the real checkpoint).
- :func:`clip_tokenizer`: a CLIP byte-level BPE tokenizer laid out like openai/clip-vit-large's
  (256 byte symbols, the same with ``</w>``, 48,894 merges, ``<|startoftext|>`` 49406,
  ``<|endoftext|>`` 49407: 49,408 tokens).

The pieces are English words followed by pronounceable pseudo-words generated from a fixed
seed, so any ASCII prompt tokenizes (and decodes back) and the ids spread over the whole
table. Both are transformers tokenizers: ``save_pretrained`` writes ``tokenizer.json`` (which
``litedge.runtime.text`` reads with the ``tokenizers`` library) and, for CLIP, ``vocab.json`` +
``merges.txt``. Building either takes about a second.
"""

from __future__ import annotations

import functools
import json
import random
import string
import tempfile
from pathlib import Path

T5_PIECES = 32000  # sentencepiece pieces, specials included
T5_EXTRA_IDS = 100
CLIP_VOCAB = 49408
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

_WORDS = """a an the of in on at to with and or by for from under over above below near beside behind
front back top side left right middle small large big tiny huge tall short long wide round square flat
red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright pale
cat dog fox bird horse cow sheep lion tiger bear wolf rabbit mouse fish owl eagle duck frog snake deer
man woman child boy girl person people face hand eye hair head portrait painting photo photograph picture
drawing sketch illustration render image art style oil watercolor digital cinematic detailed realistic
house tree forest mountain river lake sea ocean beach sky cloud sun moon star snow rain city street road
car boat ship train plane bridge tower castle garden flower rose field grass stone rock sand water fire
table chair book cup bottle window door wall floor room kitchen night day morning evening sunset sunrise
is are was be has have it its this that one two three four five many some very highly ultra high quality
best masterpiece beautiful cute old young new sitting standing running flying walking lying holding
wearing looking playing eating under circle triangle shape shapes background foreground center corner""".split()
_SUFFIXES = ["s", "es", "ed", "ing", "ly", "er", "est", "ion", "tion", "ness", "ment", "ful", "less", "al", "y"]
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sh", "sl", "sp", "st", "th", "tr", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "nt", "sh", "x"]


def _pseudo_words(rng: random.Random):
    """Endless stream of lower-case pronounceable pseudo-words of 1-3 syllables."""
    while True:
        syllables = rng.choice((1, 2, 2, 3))
        yield "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def t5_vocab(pieces: int = T5_PIECES, extra_ids: int = T5_EXTRA_IDS, seed: int = 0) -> list[tuple[str, float]]:
    """(piece, log-prob) list: specials, words, pseudo-words, single characters, then extra ids reversed.

    Scores fall from -3 to -5 over the word pieces and characters score -10, so a word in the
    table is one token and anything else splits into its longest known parts.
    """
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    char_pieces = ["\u2581"] + [c for c in chars] + ["\u2581" + c for c in chars]
    words: list[str] = []
    seen = set(char_pieces)

    def add(piece: str) -> None:
        if piece not in seen:
            seen.add(piece)
            words.append(piece)

    for w in _WORDS:
        add("\u2581" + w)
        add("\u2581" + w.capitalize())
    for s in _SUFFIXES:
        add(s)
    stream = _pseudo_words(random.Random(seed))
    room = pieces - len(specials) - len(char_pieces)
    while len(words) < room:
        w = next(stream)
        add("\u2581" + w)
        if len(words) < room:
            add(w)
    scored = [(p, -3.0 - 2.0 * i / max(len(words), 1)) for i, p in enumerate(words)]
    vocab = specials + scored + [(p, -10.0) for p in char_pieces]
    return vocab + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]


def t5_tokenizer(model_max_length: int, seed: int = 0):
    """A transformers ``T5Tokenizer`` (tokenizers backend) over :func:`t5_vocab`: 32,100 tokens."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(seed=seed), extra_ids=T5_EXTRA_IDS, model_max_length=model_max_length)


def save_t5_tokenizer(folder: Path, model_max_length: int, seed: int = 0) -> None:
    """:func:`t5_tokenizer`'s ``save_pretrained`` files (built once per seed, then copied: ~1 s saved each)."""
    files = _t5_files(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if name == "tokenizer_config.json":
            text = json.dumps({**json.loads(text), "model_max_length": model_max_length}, indent=2) + "\n"
        (folder / name).write_text(text, encoding="utf-8")


@functools.lru_cache(maxsize=2)
def _t5_files(seed: int) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        t5_tokenizer(512, seed).save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir()}


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable character table, in byte-symbol id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return [chr(table[b]) for b in printable] + [chr(table[b]) for b in range(256) if b not in printable]


def clip_vocab_and_merges(vocab_size: int = CLIP_VOCAB, seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: byte symbols, byte symbols + ``</w>``, one token per merge, then bos, eos.

    Merges build each word left to right (``c a`` -> ``ca``, ``ca t</w>`` -> ``cat</w>``), English
    words first, then pseudo-words, until ``vocab_size - 514`` merges exist.
    """
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    room = vocab_size - len(tokens) - 2

    def add_word(word: str) -> None:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            if len(merges) >= room:
                return
            merged = current + part
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((current, part))
            current = merged

    for w in _WORDS:
        add_word(w)
    stream = _pseudo_words(random.Random(seed + 1))
    while len(merges) < room:
        add_word(next(stream))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def clip_tokenizer(pad_token: str = CLIP_EOS, model_max_length: int = 77, seed: int = 0):
    """A transformers ``CLIPTokenizer`` with CLIP's 49,408-token layout (bos 49406, eos 49407).

    ``pad_token``: ``<|endoftext|>`` (CLIP-L in SD3) or ``"!"`` (CLIP-G in SD3, id 0).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(seed=seed)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)


def save_clip_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained`` plus the ``vocab.json`` + ``merges.txt`` pair real CLIP folders hold."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
