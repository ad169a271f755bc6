"""Text to token ids: one small `Tokenizer` over sentencepiece or a Hugging Face tokenizer.

    python -m mmscale.data.tokenizer --shards 'data/train-{000000..000003}.tar' --out data/tok --vocab-size 64

The model needs four special ids besides the text pieces: `pad_id`, `bos_id`, `eos_id` and `image_token_id`
(the `<image>` token that marks where an image sits in the text). They are always present and distinct:

- sentencepiece models trained here reserve pad=0, unk=1, bos=2, eos=3 and `<image>`=4 (a user-defined symbol).
  A foreign sentencepiece model without a pad or `<image>` piece gets them as extra ids after its vocabulary
  (`vocab_size` counts them); `encode` never produces them.
- Hugging Face tokenizers get `<image>` (and `<pad>`, `<s>`, `</s>` if missing) added as special tokens.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SP_MODEL_FILE = "tokenizer.model"


class Tokenizer:
    """Either `Tokenizer.from_sentencepiece(path)` or `Tokenizer.from_hf(path_or_tokenizer)`; see `load_tokenizer`."""

    def __init__(self, *, sp_model_proto: bytes | None = None, hf=None, source: str = ""):
        if (sp_model_proto is None) == (hf is None):
            raise ValueError("give exactly one of sp_model_proto or hf")
        self.source = source
        self._sp = None
        self._hf = None
        if sp_model_proto is not None:
            self._init_sp(sp_model_proto)
        else:
            self._init_hf(hf)
        specials = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "image": self.image_token_id}
        if len(set(specials.values())) != 4:
            raise ValueError(f"tokenizer {source!r}: special ids must be distinct, got {specials}")

    # ------------------------------------------------------------------------------------------- backends

    def _init_sp(self, proto: bytes) -> None:
        import sentencepiece as spm

        self._sp_proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        n = self._sp.get_piece_size()
        extra = n
        unk = self._sp.unk_id()

        def piece_or_extra(piece_id: int) -> int:
            nonlocal extra
            if 0 <= piece_id and piece_id != unk:
                return piece_id
            extra += 1
            return extra - 1

        self._pad = piece_or_extra(self._sp.pad_id())
        self._bos = piece_or_extra(self._sp.bos_id())
        self._eos = piece_or_extra(self._sp.eos_id())
        self._image = piece_or_extra(self._sp.piece_to_id(IMAGE_TOKEN))
        self._vocab_size = extra
        self._sp_size = n

    def _init_hf(self, hf) -> None:
        added = []
        wanted = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
        missing = {k: v for k, v in wanted.items() if getattr(hf, k, None) is None}
        if missing:
            hf.add_special_tokens(missing)
            added += list(missing.values())
        if hf.convert_tokens_to_ids(IMAGE_TOKEN) in (None, hf.unk_token_id):
            hf.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
            added.append(IMAGE_TOKEN)
        if added:
            log.info("tokenizer %s: added special tokens %s", self.source, added)
        self._hf = hf
        self._pad, self._bos, self._eos = hf.pad_token_id, hf.bos_token_id, hf.eos_token_id
        self._image = hf.convert_tokens_to_ids(IMAGE_TOKEN)
        self._vocab_size = len(hf)

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(sp_model_proto=Path(path).read_bytes(), source=str(path))

    @classmethod
    def from_hf(cls, path_or_tokenizer) -> Tokenizer:
        if isinstance(path_or_tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            return cls(hf=AutoTokenizer.from_pretrained(str(path_or_tokenizer)), source=str(path_or_tokenizer))
        return cls(hf=path_or_tokenizer, source=getattr(path_or_tokenizer, "name_or_path", ""))

    # Data-loader workers may be started with spawn: pickle the model bytes, not the C++ processor.
    def __getstate__(self):
        if self._sp is not None:
            return {"sp_model_proto": self._sp_proto, "source": self.source}
        return {"hf": self._hf, "source": self.source}

    def __setstate__(self, state):
        self.__init__(**state)

    # ------------------------------------------------------------------------------------------- API

    @property
    def backend(self) -> str:
        return "sentencepiece" if self._sp is not None else "hf"

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs: every id `encode` or the special ids can produce is below this."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def image_token_id(self) -> int:
        return self._image

    def piece_id(self, piece: str) -> int | None:
        """The id of `piece` as one token (e.g. a medium's placeholder, `<video>`), None when there is none."""
        if piece == IMAGE_TOKEN:
            return self.image_token_id
        if self._sp is not None:
            i = self._sp.piece_to_id(piece)
            return None if i == self._sp.unk_id() else i
        i = self._hf.convert_tokens_to_ids(piece)
        return None if i is None or i == self._hf.unk_token_id else i

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad, bos and eos are dropped, `<image>` is kept."""
        drop = {self.pad_id, self.bos_id, self.eos_id}
        ids = [int(i) for i in ids if int(i) not in drop]
        if self._sp is not None:
            parts, run = [], []
            for i in ids:  # extra ids (beyond the sentencepiece vocabulary) have no piece
                if i >= self._sp_size:
                    parts.append(self._sp.decode(run))
                    parts.append(IMAGE_TOKEN if i == self.image_token_id else "")
                    run = []
                else:
                    run.append(i)
            parts.append(self._sp.decode(run))
            return "".join(parts)
        return self._hf.decode(ids, skip_special_tokens=False)

    def unknown_words(self, words: Iterable[str]) -> list[str]:
        """Those of `words` this tokenizer cannot spell: their ids do not decode back to them (a sentencepiece
        model's unknown piece decodes to " ⁇ ", a Hugging Face one's to e.g. "[UNK]")."""
        return [w for w in words if self.decode(self.encode(w)).strip() != w]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into `directory`; returns the path to give `load_tokenizer`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._sp is not None:
            path = directory / SP_MODEL_FILE
            path.write_bytes(self._sp_proto)
            return path
        self._hf.save_pretrained(str(directory))
        return directory

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.backend}, {self.source!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"bos={self.bos_id}, eos={self.eos_id}, image={self.image_token_id})"
        )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A sentencepiece `.model` file, a folder holding only `tokenizer.model`, or a Hugging Face tokenizer folder."""
    path = Path(path)
    if path.is_file():
        return Tokenizer.from_sentencepiece(path)
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            return Tokenizer.from_hf(path)
        if (path / SP_MODEL_FILE).is_file():
            return Tokenizer.from_sentencepiece(path / SP_MODEL_FILE)
        raise FileNotFoundError(
            f"tokenizer folder {str(path)!r} holds neither tokenizer.json/tokenizer_config.json (Hugging Face) "
            f"nor {SP_MODEL_FILE} (sentencepiece)"
        )
    raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist; give a sentencepiece .model file or a folder")


def check_tokenizer_path(path: str | os.PathLike, field: str) -> list[str]:
    """Problems that would stop `load_tokenizer(path)`, for config field `field` (e.g. "data.tokenizer"); empty
    when it looks loadable.

    Cheap, for config validation (imports neither torch nor transformers): a file must parse as a sentencepiece
    model; a folder must hold tokenizer.json or tokenizer_config.json (Hugging Face; not loaded here) or a
    sentencepiece `tokenizer.model`.
    """
    fix = "give a sentencepiece .model file or a Hugging Face tokenizer folder"
    if not str(path).strip():
        return [f"{field}: empty; {fix}"]
    p = Path(path).expanduser()
    if p.is_file():
        return _check_sentencepiece_file(p, field, fix)
    if p.is_dir():
        if (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file():
            return []
        if (p / SP_MODEL_FILE).is_file():
            return _check_sentencepiece_file(p / SP_MODEL_FILE, field, fix)
        others = sorted(q.name for q in p.glob("*.model"))
        if others:
            return [
                f"{field}: {str(path)!r} is a folder without tokenizer.json, tokenizer_config.json or "
                f"{SP_MODEL_FILE}, but it holds {', '.join(others)}; give the file itself: "
                f"{field}={p / others[0]}"
            ]
        return [
            f"{field}: {str(path)!r} is a folder holding neither tokenizer.json/tokenizer_config.json (Hugging "
            f"Face) nor {SP_MODEL_FILE} (sentencepiece); {fix}"
        ]
    return [f"{field}: {str(path)!r} does not exist; {fix}"]


def _check_sentencepiece_file(path: Path, field: str, fix: str) -> list[str]:
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=path.read_bytes())
    except Exception as e:  # OSError, RuntimeError from the protobuf parser
        return [f"{field}: {str(path)!r} is not a loadable sentencepiece model ({str(e) or repr(e)}); {fix}"]
    return []


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int = 64,
    model_type: str = "auto",
    max_sentences: int = 1_000_000,
    extra_symbols: Sequence[str] = (),
) -> Path:
    """Train a sentencepiece model on `texts`; writes `{out_prefix}.model` (and `.vocab`) and returns the former.

    `model_type="auto"` picks `word` when every distinct word fits in the vocabulary (small caption vocabularies
    like the demo's: each word is one token, nothing is split) and `unigram` otherwise (subwords, with every
    character kept so unseen words still encode). `vocab_size` is an upper bound (`hard_vocab_limit=False`): a
    corpus with fewer pieces gets a smaller vocabulary instead of an error. Ids: pad 0, unk 1, bos 2, eos 3,
    `<image>` 4, then `extra_symbols` (e.g. the placeholders of other media, `<video>` and `<audio>`) from 5 on.
    """
    import sentencepiece as spm

    texts = [t.strip() for t, _ in zip(texts, range(max_sentences)) if t and t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    extra_symbols = [t for t in extra_symbols if t != IMAGE_TOKEN]
    num_special = 5 + len(extra_symbols)
    if model_type == "auto":
        words = {w for t in texts for w in t.split()}
        model_type = "word" if len(words) + num_special <= vocab_size else "unigram"
    if model_type not in ("word", "unigram", "bpe", "char"):
        raise ValueError(f"model_type must be auto, word, unigram, bpe or char; got {model_type!r}")
    if model_type != "word":
        needed = len({c for t in texts for c in t if not c.isspace()}) + num_special + 1  # + the word boundary
        if vocab_size < needed:
            raise ValueError(
                f"train_sentencepiece: vocab_size ({vocab_size}) is below the {needed} pieces a {model_type} model "
                f"needs here (every character of the texts + {num_special} specials + the word boundary); "
                f"use vocab_size >= {needed}"
            )
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=[IMAGE_TOKEN, *extra_symbols],
        num_threads=1,
        minloglevel=2,
    )
    path = Path(f"{out_prefix}.model")
    log.info("trained a %s sentencepiece model on %d texts: %s", model_type, len(texts), path)
    return path


def captions_from_shards(spec: str, limit: int | None = None) -> list[str]:
    """The `.txt` members of the shards named by `spec` (any form `resolve_shards` accepts)."""
    from mmscale.data.shards import resolve_shards

    out: list[str] = []
    for shard in resolve_shards(spec):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    out.append(tar.extractfile(member).read().decode("utf-8", errors="replace"))
                    if limit is not None and len(out) >= limit:
                        return out
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a sentencepiece tokenizer on captions.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shard spec (brace pattern, folder or list file); reads the .txt captions")
    src.add_argument("--captions", help="text file, one caption per line")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=64)
    parser.add_argument("--model-type", default="auto", choices=("auto", "word", "unigram", "bpe", "char"))
    parser.add_argument("--max-sentences", type=int, default=1_000_000)
    parser.add_argument("--extra-symbols", default="",
                        help="comma-separated pieces kept whole after <image>, e.g. other media's placeholders: "
                             "'<video>,<audio>'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.shards:
        texts = captions_from_shards(args.shards, limit=args.max_sentences)
    else:
        texts = Path(args.captions).read_text(encoding="utf-8").splitlines()
    extra = [t for t in args.extra_symbols.split(",") if t]
    path = train_sentencepiece(texts, args.out, args.vocab_size, args.model_type, args.max_sentences, extra)
    print(f"wrote {path}: {load_tokenizer(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
