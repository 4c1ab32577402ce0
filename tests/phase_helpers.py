"""Builders shared by the Phase-Mamba, tokenizer, mlx-lm Mamba and conversion tests: a tiny
Hugging Face tokenizer trained here (no download) and base folders as mlx-lm writes them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

CORPUS = Path(__file__).resolve().parents[1] / "mlx_kssm" / "corpus" / "valid.txt"
EOT = "<|endoftext|>"


def make_hf_tokenizer(folder: Path, vocab_size: int = 300, text: str | None = None) -> Path:
    """A byte-level BPE tokenizer (as GPT-2 / GPT-NeoX's, smaller) saved as transformers
    saves one: tokenizer.json + tokenizer_config.json, with <|endoftext|> as id 0 and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text or CORPUS.read_text(encoding="utf-8")[:20_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT).save_pretrained(folder)
    return folder


def write_base(folder: Path, base, tokenizer_files: Path | None = None, **config) -> Path:
    """An mlx-lm model folder: its ModelArgs as config.json (plus ``config``), its weights as
    safetensors, and the files of the tokenizer folder ``tokenizer_files`` if given."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = {**dataclasses.asdict(base.args), **config}
    (folder / "config.json").write_text(json.dumps(fields))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(base.parameters())))
    if tokenizer_files is not None:
        for path in tokenizer_files.iterdir():
            shutil.copy(path, folder / path.name)
    return folder
